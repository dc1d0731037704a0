"""The whole build under `accelerate launch` with 2 CPU processes (gloo), against the same recipe in one process.

One launch is killed (every process, right after the first distillation checkpoint), the next one resumes it with
the documented form `accelerate launch ... -m hf_minitron.cli build`, a third one finds nothing to do; the tests
below read what those three launches left. `distill.global_batch_tokens` makes an optimizer step the same 4
windows on 1 process (2 accumulated micro-batches) and on 2 (one each), and `search.batch_size` counts the windows
of a step over all processes, so both builds train on the same tokens in the same order.

Tolerance: the two builds differ only by the order of float sums (gradients all-reduced instead of accumulated, a
search step's 2 windows run as 2 batches of 1 instead of one of 2: another matmul blocking, the held-out windows
scored in 2 shares). Measured on this recipe: the distillation losses and the members' perplexities agree to the
last bit, the search's scores to 5e-7 relative. 1e-4 relative leaves room for other CPUs and BLAS builds, while
training on other windows moves a step's loss by tens of percent and a perplexity by more than 1e-3.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from helpers import teacher_and_corpus

from hf_minitron import ranks
from hf_minitron.pipeline import build
from hf_minitron.recipe import from_dict
from hf_minitron.rundir import MANIFEST, RunDir

REL = 1e-4

# every process SIGKILLs itself once all of them have saved the first checkpoint of a distillation (as if the
# machines went away); the search's retraining (save_strategy "no") is left alone
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed as dist
    from transformers import TrainerCallback
    from hf_minitron import distill
    from hf_minitron.cli import main

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == int(os.environ["KILL_AFTER_STEP"]):
                dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)

    init = distill.MinitronDistillTrainer.__init__
    def patched(self, *a, **kw):
        init(self, *a, **kw)
        if self.args.save_strategy != "no":
            self.add_callback(Kill())
    distill.MinitronDistillTrainer.__init__ = patched
    sys.exit(main(sys.argv[1:]))
""")


def tiny_recipe(files) -> dict:
    corpus = str(files / "corpus.jsonl")
    return {
        "name": "tiny", "teacher": {"source": str(files / "teacher")},
        "data": {"calibration": corpus, "distillation": corpus, "holdout": 0.2},
        "importance": {"samples": 4, "seq_len": 32, "depth_ppl_samples": 0},
        "prune": {"depth_metric": "bi"},
        "members": [{"name": "small", "params": 2_950_000},  # searched
                    {"name": "short", "shape": {"ffn_size": 64, "num_layers": 3}}],  # drops a layer
        "search": {"tolerance": 0.1, "multiple": 8, "max_candidates": 2, "tokens": 128, "seq_len": 32,
                   "batch_size": 2, "eval_windows": 2, "eval_seq_len": 32, "lora_r": 4, "lora_alpha": 8, "lr": 1e-3},
        # 2 steps of 128 tokens: 2 micro-batches of 2 x 32 on one process, one per process on two
        "distill": {"tokens": 256, "max_length": 32, "per_device_train_batch_size": 2, "global_batch_tokens": 128,
                    "save_steps": 1, "logging_steps": 1, "learning_rate": 1e-3, "min_lr": 1e-4},
        "evaluate": {"seq_len": 32, "windows": 4},
        "cost": {"scratch_tokens": "1B"},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    root = teacher_and_corpus(tmp_path_factory.mktemp("dist"), smollm2_tokenizer)
    (root / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(root)))
    (root / "driver.py").write_text(DRIVER)
    return root


@pytest.fixture(scope="module")
def one(files):
    """The recipe built in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launch's --mixed_precision, so both train in fp32
        build(from_dict(tiny_recipe(files)), files / "one", progress=False, log=lambda _: None)
    torch.set_num_threads(threads)
    return files / "one"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(files, *command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 gloo processes on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *command,
           "build", "--recipe", str(files / "r.yaml"), "--out", str(files / "two"), "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def two(files):
    """The same recipe on 2 processes: killed in its first distillation, resumed, then launched once more."""
    killed = launch(files, str(files / "driver.py"), env={"KILL_AFTER_STEP": "1"})
    after_kill = json.loads((files / "two" / MANIFEST).read_text())
    checkpoints = sorted(p.name for p in (files / "two" / "small").glob("checkpoint-*"))
    resumed = launch(files, "-m", "hf_minitron.cli")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = launch(files, "-m", "hf_minitron.cli")
    assert again.returncode == 0, again.stderr[-4000:]
    return {"out": files / "two", "killed": killed, "after_kill": after_kill, "checkpoints": checkpoints,
            "resumed": resumed, "again": again}


def _json(folder, name):
    return json.loads((folder / name).read_text())


def _actions(out) -> list[dict]:
    return [dict(b["actions"]) for b in _json(out, MANIFEST)["builds"]]


def test_a_killed_launch_leaves_its_distillation_running_with_a_checkpoint(two):
    assert two["killed"].returncode != 0
    stages = two["after_kill"]["stages"]
    assert stages["small/search"]["status"] == "done" and stages["small/distill"]["status"] == "running"
    assert two["checkpoints"] == ["checkpoint-1"]


def test_the_next_launch_skips_the_finished_stages_and_resumes_the_distillation(two):
    done = _actions(two["out"])[0]
    assert done["importance/teacher"] == done["small/search"] == done["small/prune"] == "skipped"
    assert done["small/distill"] == "resume" and done["short/distill"] == "run"
    history = _json(two["out"] / "small", "distill_result.json")["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]  # step 1 from the checkpoint, step 2 trained after


def test_a_third_launch_skips_every_stage(two):
    assert set(_actions(two["out"])[1].values()) == {"skipped"}


def test_two_processes_build_the_members_of_one(one, two):
    assert _json(two["out"] / "small", "search.json")["winner"]["shape"] == \
        _json(one / "small", "search.json")["winner"]["shape"]
    for name in ("small", "short"):
        kept = [_json(out / name, "pruning.json")["kept_layers"] for out in (one, two["out"])]
        assert kept[1] == kept[0]
        assert _json(two["out"] / name, "config.json") == _json(one / name, "config.json")
    assert _json(two["out"] / "short", "pruning.json")["kept_layers"] == [1, 2, 3]  # a layer dropped, the same one


def test_two_processes_train_on_the_same_tokens_as_one(one, two):
    for name in ("small", "short"):
        a, b = _json(one / name, "distill_result.json"), _json(two["out"] / name, "distill_result.json")
        assert (b["steps"], b["tokens"], b["tokens_per_step"]) == (a["steps"], a["tokens"], a["tokens_per_step"])
        assert b["gradient_accumulation_steps"] == a["gradient_accumulation_steps"] // 2
        losses = [[h["loss"] for h in r["log_history"] if "loss" in h] for r in (a, b)]
        assert losses[1] == pytest.approx(losses[0], rel=REL)
    scores = [[[c["score_before"]] + [p["perplexity"] for p in c["curve"]]
               for c in _json(out / "small", "search.json")["candidates"]] for out in (one, two["out"])]
    assert scores[1] == [pytest.approx(s, rel=REL) for s in scores[0]]


def test_two_processes_give_the_held_out_perplexities_of_one(one, two):
    for name in ("small", "short"):
        a, b = (_json(out / name, "eval_results.json")["perplexity"][0] for out in (one, two["out"]))
        assert b["tokens"] == a["tokens"] and b["perplexity"] == pytest.approx(a["perplexity"], rel=REL)
    assert _json(two["out"] / "eval", "teacher.json")["perplexity"][0]["perplexity"] == \
        pytest.approx(_json(one / "eval", "teacher.json")["perplexity"][0]["perplexity"], rel=REL)


def test_the_manifest_is_written_by_one_process_and_matches_the_run_folder(two):
    out = two["out"]
    manifest = _json(out, MANIFEST)
    assert len(manifest["builds"]) == 2  # the two launches that finished, once each
    assert {s["status"] for s in manifest["stages"].values()} == {"done"}
    run = RunDir(out, manifest)
    assert [key for key in manifest["stages"] if run.changed_output(key)] == []  # every output file as recorded
    assert not (out / (MANIFEST + ".tmp")).exists()


def test_the_build_prints_its_lines_once(two):
    lines = two["resumed"].stdout.splitlines()
    assert lines.count("== member small (budget 2.95M)") == 1
    assert sum("[small/search] done earlier: skipped" in line for line in lines) == 1
    assert sum(line.startswith("stages this run:") for line in lines) == 1


def test_a_process_other_than_the_main_one_never_writes_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(ranks, "is_main", lambda: False)
    RunDir(tmp_path / "run", {"version": 1, "stages": {}}).save()
    assert not (tmp_path / "run").exists()


def test_the_search_batch_must_split_evenly_across_processes(monkeypatch):
    from hf_minitron.search_train import per_process_batch

    monkeypatch.setattr(ranks, "world", lambda: 2)
    assert per_process_batch(4) == 2
    with pytest.raises(ValueError, match="search.batch_size 3 is not a multiple of the 2 processes"):
        per_process_batch(3)


def test_the_wait_for_the_main_process_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(ranks.WAIT_TIMEOUT_ENV, "90")
    assert ranks.wait_timeout().total_seconds() == 90
    monkeypatch.setenv(ranks.WAIT_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="HF_MINITRON_WAIT_TIMEOUT='soon'"):
        ranks.wait_timeout()


def test_the_end_of_a_launch_destroys_its_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ranks.finish()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
