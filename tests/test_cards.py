"""Model cards: front matter parses with huggingface_hub and carries the required fields and model-index; body tables
come from the configs and metadata; the lineage follows member.json (base, chained, instruct)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from helpers import (distill_record, pruning_record, tiny_config, write_base_member, write_instruct_member,
                     write_member_folder)

from hf_minitron.cards import CardError, collect_member, render_member_card, write_member_card
from hf_minitron.rundir import DISTILL_FILE, EVAL_FILE, MEMBER_FILE, PRUNING_FILE

RESULTS = {
    "model": "tiny-50M", "parameters": 52_000,
    "perplexity": [{"data": "/x/wikitext2_test.txt", "config": None, "split": "train", "seq_len": 512, "stride": 512,
                    "tokens": 8192, "perplexity": 74.2}],
    "tasks": {"hellaswag": {"metrics": {"acc": 0.31, "acc_stderr": 0.01, "acc_norm": 0.35, "acc_norm_stderr": 0.01},
                            "num_fewshot": 10, "limit": None, "samples": 10042, "scorer": "lm-eval 0.4.13"},
              "local_hellaswag_val_dev": {"metrics": {"acc": 0.3, "acc_norm": 0.33}, "num_fewshot": 0, "limit": 300}},
}


@pytest.fixture()
def member(tmp_path):
    """A pruned + distilled tiny member folder, and its teacher folder with a licensed model card."""
    teacher = tiny_model("llama")
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    (teacher_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# teacher\n")
    folder = write_member_folder(tmp_path / "tiny-50M", config=tiny_config(intermediate_size=48), weights=False,
                                 files={PRUNING_FILE: pruning_record(teacher=str(teacher_dir)),
                                        DISTILL_FILE: distill_record(teacher=str(teacher_dir)), EVAL_FILE: RESULTS})
    return folder, teacher_dir


def test_member_card_front_matter_and_body(member):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    folder, teacher_dir = member
    path = write_member_card(folder, repo_id="org/tiny-50M", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                             datasets=["Salesforce/wikitext", "local.txt"], scratch_tokens=2_000_000_000)
    meta = metadata_load(path)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # inherited from the teacher's card
    assert meta["datasets"] == ["Salesforce/wikitext"]  # local files are not Hub data sets
    assert {"pruned", "knowledge-distillation", "minitron", "hf-minitron"} <= set(meta["tags"])
    card = ModelCard.load(path)
    evals = card.data.eval_results
    assert card.data.model_name == "tiny-50M"
    found = {(e.dataset_type, e.metric_type): e.metric_value for e in evals}
    assert found[("Rowan/hellaswag", "acc_norm")] == 0.35 and found[("wikitext2_test", "perplexity")] == 74.2
    assert meta["model-index"][0]["name"] == "tiny-50M"

    body = card.text
    assert "| MLP size | 96 | 48 |" in body and "| layers | 4 | 4 |" in body  # teacher vs member from the configs
    assert "1,000× fewer" in body and "2,000,000" in body
    assert 'from_pretrained("org/tiny-50M")' in body
    assert "Pruned** to ffn_size=48" in body and "logit_loss=forward_kl" in body
    assert "--ffn-size 48" in body  # reproduce commands from the metadata
    assert "{{" not in body and "{%" not in body


def test_card_without_metadata_and_errors(tmp_path):
    from huggingface_hub.repocard import metadata_load

    folder = tmp_path / "bare"
    tiny_model("qwen2").config.save_pretrained(folder)
    path = write_member_card(folder)
    meta = metadata_load(path)
    assert "base_model" not in meta and "model-index" not in meta and meta["pipeline_tag"] == "text-generation"
    assert "Not evaluated yet" in path.read_text()
    with pytest.raises(CardError, match="no config.json"):
        collect_member(tmp_path / "nothing")
    with pytest.raises(CardError, match="unknown member field"):
        collect_member(folder, colour="red")


def test_render_uses_given_template_dir(member, tmp_path):
    folder, _ = member
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "member.md.j2").write_text("---\n{{ card_data }}\n---\nshort card for {{ repo_id }}\n")
    text = render_member_card(collect_member(folder), "org/x", template_dir=tmp_path / "tpl")
    assert text.endswith("short card for org/x\n")
    with pytest.raises(CardError, match="does not exist"):
        render_member_card(collect_member(folder), template_dir=tmp_path / "missing")


def test_card_of_an_unsupported_architecture_names_it(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}))
    with pytest.raises(CardError, match="cannot read the member's architecture.*unsupported architecture"):
        write_member_card(folder)


def test_card_table_takes_head_dim_from_the_arch_helpers(tmp_path):
    folder = write_member_folder(tmp_path / "m", config=tiny_config(head_dim=None), weights=False)
    text = write_member_card(folder).read_text()
    assert "| head dim | 16 |" in text, "hidden 64 / 4 heads"


# ---- lineage ----


@pytest.fixture()
def family(tmp_path):
    """A run's members: m-90M pruned from the teacher, its instruct variant, and m-45M pruned from m-90M."""
    write_base_member(tmp_path / "m-90M")
    write_instruct_member(tmp_path / "m-90M-instruct", base="m-90M")
    write_base_member(tmp_path / "m-45M", pruned_from="m-90M", distilled_from="m-90M")
    return tmp_path


def _card(folder) -> str:
    return write_member_card(folder).read_text()


def test_instruct_card_says_it_was_fine_tuned_from_its_base(family):
    text = _card(family / "m-90M-instruct")
    assert "**Fine-tuned (SFT) from** `m-90M`" in text, text
    assert "Supervised fine-tuning** of `m-90M`: 20 steps on 64 examples" in text


def test_instruct_card_does_not_call_its_base_an_earlier_pruning_step(family):
    text = _card(family / "m-90M-instruct")
    assert "an earlier member of the family" not in text, "the SFT base is not a pruning parent"


def test_instruct_card_shows_how_its_base_was_made(family):
    text = _card(family / "m-90M-instruct")
    assert "**Pruned** from the teacher to ffn_size=48" in text, "the base's pruning.json, from the sibling folder"
    assert "**Distilled** from the teacher on 2,000,000 tokens" in text, "the base's distill_result.json"


def test_instruct_card_prefers_its_own_copy_of_the_base_metadata(family):
    folder = family / "m-90M-instruct"
    (folder / PRUNING_FILE).write_text(json.dumps(pruning_record(ffn_size=40)))
    assert "to ffn_size=40" in _card(folder)


def test_instruct_card_from_the_old_member_schema(family):
    folder = family / "m-90M-instruct"
    (folder / MEMBER_FILE).write_text(json.dumps({"name": folder.name, "parent": "m-90M", "teacher": "org/t",
                                                  "instruct": True}))
    text = _card(folder)
    assert "**Fine-tuned (SFT) from** `m-90M`" in text
    assert "an earlier member of the family" not in text


def test_chained_member_card_names_the_member_it_was_pruned_from(family):
    text = _card(family / "m-45M")
    assert "**Pruned** from `m-90M`, an earlier member of the family" in text, text
    assert "**Distilled** from `m-90M`" in text


def test_base_member_card_says_pruned_from_the_teacher(family):
    text = _card(family / "m-90M")
    assert "**Pruned** from the teacher to ffn_size=48" in text
    assert "Fine-tuned" not in text


def test_member_card_says_when_intermediate_losses_were_turned_on(tmp_path):
    note = "is_layers auto: the student keeps 2 of the teacher's 4 layers (< 3/4), so L_is is on: 0:0,2:1"
    folder = write_member_folder(tmp_path / "tiny-deep", config=tiny_config(num_hidden_layers=2), weights=False,
                                 files={DISTILL_FILE: {**distill_record(), "is_policy": note}})
    card = write_member_card(folder).read_text()
    assert note in card


def test_member_card_shows_its_recovery_curve_when_the_folder_has_one(member):
    from hf_minitron.rundir import FAMILY_PLOT, RECOVERY_PLOT

    folder, _ = member
    (folder / FAMILY_PLOT).write_bytes(b"png")
    (folder / RECOVERY_PLOT).write_bytes(b"png")
    meta = collect_member(folder)
    assert meta.plot == FAMILY_PLOT and meta.recovery_plot == RECOVERY_PLOT  # the family plot is not the curve
    assert f"![recovery by distillation]({RECOVERY_PLOT})" in render_member_card(meta)


def test_member_card_lists_the_greedy_continuations_and_their_loops(member):
    folder, _ = member
    results = {**RESULTS, "greedy": [{"prompt": "a|b", "continuation": "x\ny | z", "loop": None},
                                     {"prompt": "p", "continuation": "of the of the of the", "loop": "of the"}]}
    (folder / EVAL_FILE).write_text(json.dumps(results))
    body = render_member_card(collect_member(folder))
    assert "| a\\|b | x y \\| z | none |" in body and "| p | of the of the of the | of the |" in body
