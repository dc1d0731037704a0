"""Checkpoints: an interrupted save is set aside and the newest complete checkpoint is resumed from."""

from __future__ import annotations

import json

from hf_minitron.checkpoints import drop_checkpoints, last_complete_checkpoint


def complete(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return folder


def test_newest_complete_checkpoint_is_found(tmp_path):
    complete(tmp_path / "checkpoint-2")
    complete(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_interrupted_save_is_set_aside(tmp_path):
    complete(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}")  # killed before the weights
    notes = []
    assert last_complete_checkpoint(tmp_path, log=notes.append) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "incomplete-checkpoint-4" / "config.json").is_file()
    assert not (tmp_path / "checkpoint-4").exists()
    assert len(notes) == 1 and "checkpoint-4 is incomplete" in notes[0]


def test_truncated_trainer_state_is_incomplete(tmp_path):
    folder = complete(tmp_path / "checkpoint-6")
    (folder / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(tmp_path, log=lambda _: None) is None


def test_no_checkpoint_and_no_folder(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_drop_removes_checkpoints_and_set_aside_ones(tmp_path):
    complete(tmp_path / "checkpoint-2")
    (tmp_path / "incomplete-checkpoint-4").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"final")
    drop_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


INTERRUPT_DRIVER = """
import os, signal, sys
from transformers import TrainerCallback
from hf_minitron import distill
from hf_minitron.cli import main

class CtrlC(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 1:  # during step 2, as a user's Ctrl-C would
            os.kill(os.getpid(), signal.SIGINT)

init = distill.MinitronDistillTrainer.__init__
def patched(self, *a, **kw):
    init(self, *a, **kw)
    if os.environ.get("CTRL_C"):
        self.add_callback(CtrlC())
distill.MinitronDistillTrainer.__init__ = patched
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_distillation_saves_a_checkpoint_and_resume_finishes(tmp_path, smollm2_tokenizer):
    import os
    import subprocess
    import sys

    from helpers import teacher_folder

    model = teacher_folder(tmp_path / "model", smollm2_tokenizer)
    (tmp_path / "driver.py").write_text(INTERRUPT_DRIVER)
    out = tmp_path / "out"
    argv = [sys.executable, str(tmp_path / "driver.py"), "distill", "--teacher", str(model), "--student", str(model),
            "--data", "pydoc-topics", "--tokens", "256", "--max-length", "32", "--per-device-train-batch-size", "2",
            "--save-steps", "100", "--logging-steps", "1", "--disable-tqdm", "--out", str(out)]
    # 4 steps and no periodic checkpoint: the only checkpoint is the one saved at the interrupt
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    stopped = subprocess.run(argv, capture_output=True, text=True, env={**env, "CTRL_C": "1"}, timeout=600)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    saved = out / "checkpoint-2"
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"hf-minitron distill: interrupted at step 2 of 4; checkpoint saved in '{saved}'; add --resume to the same "
        "command to continue")
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 2
    assert not (out / "config.json").exists()  # not a finished model

    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((out / "distill_result.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # 1-2 before Ctrl-C, 3-4 after the resume
    assert (out / "config.json").is_file() and not saved.exists()
