"""Model cards: front matter parses with huggingface_hub and carries the required fields and model-index; body tables
come from the configs and metadata; the family table and plot."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from hf_minitron.cards import (CardError, collect_member, family_table, plot_family, render_family_card,
                               render_member_card, write_family_report, write_member_card)

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
    student = tiny_model("llama")
    student.config.intermediate_size = 48  # only the config matters for the card
    folder = tmp_path / "tiny-50M"
    student.config.save_pretrained(folder)
    (folder / "pruning.json").write_text(json.dumps({
        "teacher": {"source": str(teacher_dir)}, "target": {"ffn_size": 48, "hidden_size": None, "num_layers": None},
        "options": {"batch_agg": None, "seq_agg": None, "depth_metric": "ppl", "merge_heads": True},
        "kept_layers": [0, 1, 2, 3], "teacher_parameters": 70_000, "student_parameters": 52_000}))
    (folder / "distill_result.json").write_text(json.dumps({
        "tokens": 2_000_000, "steps": 100, "train_loss": 1.23, "max_tokens": 2_000_000, "teacher": str(teacher_dir),
        "losses": {"logit_loss": "forward_kl", "temperature": 1.0, "top_k": None, "w_logit": 1.0}}))
    (folder / "eval_results.json").write_text(json.dumps(RESULTS))
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


def test_family_table_plot_and_card(tmp_path):
    teacher = {"model": "teacher", "parameters": 135_000_000,
               "perplexity": [{"data": "w.txt", "seq_len": 512, "perplexity": 26.1}],
               "tasks": {"hs": {"metrics": {"acc": 0.377, "acc_norm": 0.44}}}}
    small = {"model": "m-90M", "parameters": 90_000_000,
             "perplexity": [{"data": "w.txt", "seq_len": 512, "perplexity": 40.0}],
             "tasks": {"hs": {"metrics": {"acc": 0.3, "acc_norm": 0.35}}}}
    table = family_table([small, teacher])
    lines = table.splitlines()
    assert lines[0] == "| model | parameters | size | ppl w | hs acc_norm |"
    assert lines[2].startswith("| teacher | 135M | 100% | 26.1 | 0.44 |") and lines[3].startswith("| m-90M | 90M | 67%")
    png = plot_family([teacher, small], tmp_path / "family.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = render_family_card([teacher, small], "tiny family", teacher="HuggingFaceTB/SmolLM2-135M-Instruct",
                              members={"m-90M": "https://hf.co/org/m-90M"}, plot="family.png", license="apache-2.0")
    assert "![quality vs parameters](family.png)" in text and "[m-90M](https://hf.co/org/m-90M)" in text
    assert table in text
    paths = write_family_report([teacher, small], tmp_path / "family", "tiny family", teacher="teacher")
    assert json.loads(paths["results"].read_text())[0]["model"] == "teacher"
    assert paths["table"].read_text() == table and paths["plot"].is_file()
    assert "![quality vs parameters](family.png)" in paths["card"].read_text()
    with pytest.raises(CardError, match="no evaluation results"):
        family_table([])


def test_render_uses_given_template_dir(member, tmp_path):
    folder, _ = member
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "member.md.j2").write_text("---\n{{ card_data }}\n---\nshort card for {{ repo_id }}\n")
    text = render_member_card(collect_member(folder), "org/x", template_dir=tmp_path / "tpl")
    assert text.endswith("short card for org/x\n")
    with pytest.raises(CardError, match="does not exist"):
        render_member_card(collect_member(folder), template_dir=tmp_path / "missing")
