"""Fault injection, the fast cases: bad input to the real command line fails at once, in one line that names the bad
value, with no traceback and before any expensive work; hostile input (a YAML alias bomb, a recipe name that escapes
runs/) is refused. Kills, full disks and concurrent builds are the long cases (bench/faults.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import lru_cache

import pytest
import yaml
from helpers import teacher_folder

from hf_minitron.cli import main


def cli(argv, capsys) -> tuple[int, str]:
    """Exit code and the error line of one run of the CLI (argparse errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    return code, lines[-1] if lines else ""


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 50], trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE trained in a blink: no GGUF to parse, small embeddings."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Llama folder with 64 positions."""
    return teacher_folder(tmp_path_factory.mktemp("teacher"), tiny_tokenizer(), max_position_embeddings=64)


@pytest.fixture()
def broken(teacher, tmp_path):
    """A copy of the teacher folder, to break."""
    return shutil.copytree(teacher, tmp_path / "broken")


def write_recipe(folder, **changes):
    raw = {"name": "t", "teacher": {"source": "some/model"},
           "data": {"calibration": "pydoc-topics", "distillation": "pydoc-topics"}, "distill": {"tokens": "1M"},
           "members": [{"name": "a", "shape": {"ffn_size": 64}}, {"name": "b", "parent": "a",
                                                                  "shape": {"ffn_size": 32}}]}
    raw.update(changes)
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- security ----


def test_recipe_name_that_escapes_runs_is_refused(tmp_path, capsys):
    code, line = cli(["build", "--recipe", write_recipe(tmp_path, name="../../escape"), "--dry-run"], capsys)
    assert code == 2 and "name: '../../escape' must be a folder name" in line


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 9)}]\n" for i in range(10))


@pytest.mark.parametrize("where", ["recipe", "override"])
def test_yaml_alias_bomb_fails_fast(tmp_path, capsys, where):
    recipe = write_recipe(tmp_path)
    if where == "recipe":
        recipe.write_text(recipe.read_text() + BOMB)
        overrides = []
    else:
        overrides = ["distill.tokens=[&a [1, 2, 3], *a, *a]"]
    start = time.time()
    code, line = cli(["build", "--recipe", recipe, "--dry-run", *overrides], capsys)
    assert code == 2 and "YAML aliases (*name) are not accepted" in line and time.time() - start < 10
    assert ("r.yaml" if where == "recipe" else "override distill.tokens") in line


# ---- recipes and arguments: caught by --dry-run or at parse time ----


@pytest.mark.parametrize("override, message", [
    ("distill.tokens=[1, 2", "override distill.tokens='[1, 2' is not valid YAML"),
    ("distill.max_length=0", "distill.max_length: must be at least 1, got 0"),
    ("members.a.teacher=a", "members.0.teacher: 'a' is not an earlier member"),
    ("members.a.teacher=b", "members.0.teacher: 'b' is not an earlier member"),
])
def test_recipe_mistakes_fail_the_dry_run(tmp_path, capsys, override, message):
    code, line = cli(["build", "--recipe", write_recipe(tmp_path), "--dry-run", override], capsys)
    assert code == 2 and message in line


@pytest.mark.parametrize("argv, message", [
    (["importance", "--teacher", "T", "--data", "pydoc-topics", "--out", "OUT", "--batch-size", "0"],
     "--batch-size: must be at least 1, got 0"),
    (["eval", "--model", "T", "--data", "pydoc-topics", "--out", "OUT/r.json", "--seq-len", "0"],
     "--seq-len: must be at least 1, got 0"),
    (["eval", "--model", "T", "--data", "pydoc-topics", "--out", "OUT/r.json", "--windows", "-3"],
     "--windows: must be at least 0, got -3"),
    (["space", "T", "--port", "99999"], "argument --port: port '99999' is not a number in 1..65535"),
    (["sft", "--model", "T", "--data", "x.jsonl", "--out", "OUT", "--chat-template", "/missing/chat.jinja"],
     "chat_template '/missing/chat.jinja': no such file or folder"),
])
def test_bad_arguments_fail_before_loading(teacher, tmp_path, capsys, argv, message):
    argv = [str(teacher) if a == "T" else a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code, line = cli(argv, capsys)
    assert code == 2 and message in line
    assert not (tmp_path / "out").exists()


def test_eval_of_a_missing_model_says_so(tmp_path, capsys):
    code, line = cli(["eval", "--model", tmp_path / "nope", "--data", "pydoc-topics"], capsys)
    assert code == 2 and f"model path '{tmp_path / 'nope'}' does not exist" in line


# ---- output paths, checked before the work ----


@pytest.mark.parametrize("command", ["importance", "prune"])
def test_unwritable_out(teacher, capsys, command):
    extra = ["--data", "pydoc-topics"] if command == "importance" else ["--importance", "scores"]
    code, line = cli([command, "--teacher", teacher, *extra, "--out", "/proc/hf-minitron/out"], capsys)
    assert code == 2 and "argument --out: '/proc/hf-minitron/out' is not writable" in line


def test_out_that_is_a_file(teacher, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, line = cli(["prune", "--teacher", teacher, "--importance", "s", "--out", tmp_path / "file"], capsys)
    assert code == 2 and f"'{tmp_path / 'file'}' is a file; give a folder" in line
    code, line = cli(["eval", "--model", teacher, "--data", "pydoc-topics", "--out", tmp_path], capsys)
    assert code == 2 and f"'{tmp_path}' is a folder; give a file" in line


CLI = "import sys; from hf_minitron.cli import main; sys.exit(main())"


def test_full_disk_is_one_line(teacher, tmp_path):
    import resource
    import signal
    import subprocess
    import sys

    def cap():  # every file capped at 300 bytes, a write past it fails with EFBIG as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    proc = subprocess.run([sys.executable, "-c", CLI, "importance", "--teacher", str(teacher), "--data",
                           "pydoc-topics", "--samples", "2", "--seq-len", "16", "--depth-ppl-samples", "0", "--out",
                           str(tmp_path / "scores")], capture_output=True, text=True, preexec_fn=cap, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "hf-minitron importance: error: disk full (" in proc.stderr.strip().splitlines()[-1]


# ---- broken model files ----


def _garbage(folder):
    (folder / "model.safetensors").write_bytes(b"\x07" * 5000)


def _truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _bad_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama", ')


def _bad_tokenizer(folder):
    (folder / "tokenizer.json").write_text("{garbage")


@pytest.mark.parametrize("breaks, file, message", [
    (_garbage, "model.safetensors", "is truncated or corrupt"),
    (_truncated, "model.safetensors", "its header says"),
    (_bad_config, "config.json", "is not valid JSON"),
    (_bad_tokenizer, "broken", "cannot load the tokenizer"),
])
def test_broken_model_files_are_named(broken, tmp_path, capsys, breaks, file, message):
    breaks(broken)
    code, line = cli(["eval", "--model", broken, "--data", "pydoc-topics", "--out", tmp_path / "r.json"], capsys)
    assert code == 2 and message in line and str(broken / file if file != "broken" else broken) in line


def test_truncated_gguf_is_named(smollm2_path, tmp_path, capsys):
    gguf = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        gguf.write_bytes(f.read(300_000))
    code, line = cli(["params", "--teacher", gguf, "--ffn-size", "64"], capsys)
    assert code == 2 and f"'{gguf}' (truncated or corrupt?)" in line


def test_unsupported_architecture_is_found_before_the_weights(broken, tmp_path, capsys):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2"]}))
    _garbage(broken)  # never read: the architecture is refused first
    code, line = cli(["eval", "--model", broken, "--data", "pydoc-topics", "--out", tmp_path / "r.json"], capsys)
    assert code == 2 and "unsupported architecture model_type='gpt2'" in line


def test_truncated_manifest_is_named(teacher, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"version": 1, "stages": {')
    recipe = write_recipe(tmp_path, teacher={"source": str(teacher)})
    code, line = cli(["build", "--recipe", recipe, "--out", run, "--quiet"], capsys)
    assert code == 2 and f"'{run / 'manifest.json'}' is not valid JSON" in line


# ---- accepted but wrong, before ----


def test_importance_of_another_model_is_refused(teacher, tmp_path, capsys):
    other = teacher_folder(tmp_path / "other", tiny_tokenizer(), seed=1, max_position_embeddings=64)  # same shape
    scores = tmp_path / "scores"
    assert cli(["importance", "--teacher", teacher, "--data", "pydoc-topics", "--samples", "2", "--seq-len", "16",
                "--depth-ppl-samples", "0", "--out", scores], capsys)[0] == 0
    code, line = cli(["prune", "--teacher", other, "--importance", scores, "--ffn-size", "64",
                      "--out", tmp_path / "pruned"], capsys)
    assert code == 2 and f"were computed on '{teacher}', not on '{other}'" in line
    assert not (tmp_path / "pruned").exists()


def test_build_warns_of_lengths_beyond_the_positions_before_any_work(teacher, tmp_path, capsys):
    recipe = write_recipe(tmp_path, teacher={"source": str(teacher)},
                          data={"calibration": str(tmp_path / "missing.jsonl"), "distillation": "pydoc-topics"})
    code = main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--quiet",
                 "importance.seq_len=96", "distill.max_length=32", "evaluate.seq_len=32"])
    err = capsys.readouterr().err
    assert "warning: importance.seq_len 96 is beyond the model's 64 positions" in err
    assert "distill.max_length" not in err and "evaluate.seq_len" not in err
    assert code == 2 and "missing.jsonl': no such file or folder" in err  # the warning came before the first stage


def test_seq_len_beyond_the_positions_warns(teacher, tmp_path, capsys):
    code = main(["eval", "--model", str(teacher), "--data", "pydoc-topics", "--seq-len", "96", "--windows", "1",
                 "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 0 and "warning: perplexity seq_len 96 is beyond the model's 64 positions" in err


# ---- data ----


def test_distill_on_a_numeric_text_column_fails_in_one_line(teacher, tmp_path, capsys):
    data = tmp_path / "nums.jsonl"
    data.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(8)))
    code, line = cli(["distill", "--teacher", teacher, "--student", teacher, "--data", data, "--max-length", "32",
                      "--tokens", "256", "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"column 'text' of data source '{data}' holds int64 values, not text" in line


def test_sft_on_a_missing_local_path_fails_before_the_hub(teacher, tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    start = time.time()
    code, line = cli(["sft", "--model", teacher, "--data", "chats/v2/train", "--chat-template", template,
                      "--out", tmp_path / "out"], capsys)
    assert code == 2 and "data file 'chats/v2/train': no such file or folder" in line and time.time() - start < 30


def test_malformed_jsonl_names_the_line(teacher, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"\n')
    code, line = cli(["eval", "--model", teacher, "--data", data, "--out", tmp_path / "r.json"], capsys)
    assert code == 2 and f"data file '{data}' line 2 is not valid JSON" in line


# ---- a rerun checks what the last build left ----


def _tiny_build_recipe(teacher) -> dict:
    """One member of explicit shape, distilled for 4 steps on pydoc-topics: a build in seconds."""
    return {"name": "t", "teacher": {"source": str(teacher)},
            "data": {"calibration": "pydoc-topics", "distillation": "pydoc-topics", "holdout": 0.2},
            "importance": {"samples": 2, "seq_len": 32, "depth_ppl_samples": 0}, "prune": {"depth_metric": "bi"},
            "members": [{"name": "a", "shape": {"ffn_size": 64}}],
            "distill": {"tokens": 256, "max_length": 32, "per_device_train_batch_size": 2, "save_steps": 2},
            "evaluate": {"seq_len": 32, "windows": 2}, "cost": {"scratch_tokens": "1M"}}


@pytest.mark.usefixtures("one_thread")
def test_damaged_or_deleted_member_is_rebuilt_and_evaluated_again(teacher, tmp_path):
    from hf_minitron.pipeline import build
    from hf_minitron.recipe import from_dict

    out, lines = tmp_path / "run", []

    def rebuild() -> dict:
        lines.clear()
        return dict(build(from_dict(_tiny_build_recipe(teacher)), out, progress=False, log=lines.append)["actions"])

    rebuild()
    weights = (out / "a" / "model.safetensors").read_bytes()
    first_eval = json.loads((out / "a" / "eval_results.json").read_text())["perplexity"]

    (out / "a" / "model.safetensors").write_bytes(weights[:1000])  # truncated: no longer the output recorded
    done = rebuild()
    assert done["a/distill"] == "redo" and done["importance/teacher"] == done["a/prune"] == "skipped"
    assert any(line.endswith(f"[a/distill] redo: a/model.safetensors is 1,000 bytes, was {len(weights):,}")
               for line in lines)
    assert (out / "a" / "model.safetensors").read_bytes() == weights  # seeded: the same weights again
    assert done["a/evaluate"] == "redo"  # the redone distillation cleared the member folder: evaluated again
    assert json.loads((out / "a" / "eval_results.json").read_text())["perplexity"] == first_eval

    shutil.rmtree(out / "a")
    done = rebuild()
    assert done["a/distill"] == done["a/evaluate"] == "redo"
    assert any(line.endswith("[a/distill] redo: a is missing") for line in lines)
    assert "| a |" in (out / "family" / "family.md").read_text()  # the family report has the member again

    assert set(rebuild().values()) == {"skipped"}
