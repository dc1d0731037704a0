"""FSDP2 distillation on 2 CPU processes (gloo), through accelerate's FSDP preset, against a single process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_distill import save_pair, write_corpus

PRESET = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp.yaml"

SCRIPT = textwrap.dedent("""
    import json, sys
    from transformers import TrainerCallback
    from hf_minitron import distill as d
    from hf_minitron.archs import get_arch
    from hf_minitron.sharding import local_bytes

    def emit(tag, record):  # one write of one whole line: print("RANK", x) writes its parts apart, and the two
        sys.stdout.write(f"{tag} {json.dumps(record)}\\n")  # processes' parts interleave in the shared pipe
        sys.stdout.flush()

    class Report(TrainerCallback):  # how each model is held by this process once training runs
        trainer = None
        def on_step_end(self, a, state, control, **kw):
            t = self.trainer
            if state.global_step == 1:
                layers = get_arch(t.teacher.config).decoder_layers(t.teacher)
                emit("RANK", {
                    "rank": t.accelerator.process_index, "type": t.accelerator.distributed_type.value,
                    "wrapper": type(t.model_wrapped).__name__, "student": local_bytes(t.model),
                    "teacher": local_bytes(t.teacher), "teacher_layers": local_bytes(layers),
                    "dtensors": sum(hasattr(p, "to_local") for p in t.model.parameters())})

    orig = d.MinitronDistillTrainer.__init__
    def init(self, *a, **kw):
        orig(self, *a, **kw)
        report = Report()
        report.trainer = self
        self.add_callback(report)
    d.MinitronDistillTrainer.__init__ = init
    r = d.distill(**json.loads(sys.argv[1]))
    emit("LOSSES", [h["loss"] for h in r["log_history"] if "loss" in h])
    from accelerate import PartialState
    PartialState().destroy_process_group()  # before exit: a group left to the interpreter's teardown can abort a rank
""")


def _run(tmp_path: Path, args: dict, processes: int) -> subprocess.CompletedProcess:
    script = tmp_path / "run_fsdp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(script), json.dumps(args)]
    if processes > 1:  # ACCELERATE_USE_CPU=1: the preset's processes on CPU with gloo (see hf_minitron/sharding.py)
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PRESET), "--num_processes",
               str(processes), "--mixed_precision", "no", "--main_process_port", "29541"] + cmd[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _lines(proc, tag: str) -> list:
    """Every `TAG {json}` record in the run's stdout, wherever it starts: the two processes share one pipe, and the
    trainer's own prints of one can leave part of a line in front of the other's record."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(proc.stdout, m.end())[0] for m in re.finditer(rf"{tag} (?=[\[{{])", proc.stdout)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same distillation (L_logit + L_is, 4 steps of 4 windows) on 2 FSDP processes and on one process."""
    tmp = tmp_path_factory.mktemp("fsdp")
    teacher, student = save_pair(tmp)
    base = dict(teacher=teacher, student=student, data=write_corpus(tmp), max_tokens=4 * 4 * 32, max_length=32,
                report_to=[], kd_chunk_tokens=16, is_layers="0:0,3:2", save_steps=2, logging_steps=1,
                bf16=False)  # the launch says mixed_precision no; the single process must match it
    sharded = _run(tmp, {**base, "out": str(tmp / "fsdp"), "per_device_train_batch_size": 2}, processes=2)
    single = _run(tmp, {**base, "out": str(tmp / "one"), "per_device_train_batch_size": 4}, processes=1)
    return tmp, sharded, single


def test_fsdp_preset_really_shards_the_student_on_cpu(runs):
    ranks = _lines(runs[1], "RANK")
    assert sorted(r["rank"] for r in ranks) == [0, 1], runs[1].stdout[-3000:]  # what the processes printed
    for r in ranks:
        assert (r["type"], r["wrapper"]) == ("FSDP", "FSDPLlamaForCausalLM")
        assert r["dtensors"] > 0
        local, full = r["student"]
        assert local == pytest.approx(full / 2, rel=0.02)  # each rank holds half of the student's bytes


def test_fsdp_shards_the_teachers_layers_and_keeps_its_head_whole(runs):
    for r in _lines(runs[1], "RANK"):
        local, full = r["teacher_layers"]
        assert local == pytest.approx(full / 2, rel=0.02)
        t_local, t_full = r["teacher"]
        assert t_local - local == t_full - full  # embeddings, final norm, LM head: whole on every rank


def test_fsdp_loss_curve_matches_one_process(runs):
    sharded, single = _lines(runs[1], "LOSSES")[0], _lines(runs[2], "LOSSES")[0]
    assert len(sharded) == len(single) == 4
    assert sharded == pytest.approx(single, rel=1e-4)


def test_fsdp_saves_a_plain_student_without_projections(runs):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = runs[0] / "fsdp"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(runs[0] / "one" / "model.safetensors"), "pt") as f:
        assert names == set(f.keys())
    assert not [n for n in names if "minitron" in n]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32
    assert not list(out.glob("checkpoint-*"))


def test_cpu_fsdp_is_left_alone_without_an_fsdp_launch(monkeypatch):
    from hf_minitron.sharding import enable_cpu_fsdp

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert enable_cpu_fsdp(cpu=True) is False


def test_local_bytes_counts_a_plain_model_whole():
    from hf_minitron.sharding import local_bytes

    model = torch.nn.Linear(4, 3)
    assert local_bytes(model) == (15 * 4, 15 * 4)


def test_distillation_refuses_zero3_in_one_line(monkeypatch):
    from hf_minitron.sharding import refuse_zero3

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO-3.*fsdp.yaml"):
        refuse_zero3()
