"""Trainer checkpoints of a run folder: find the newest complete one to resume from, drop them when done.

A checkpoint is complete once `trainer_state.json` (the Trainer writes it after the weights, optimizer, scheduler
and RNG states) is there and parses, next to weights. A kill or a full disk during a save leaves an incomplete
`checkpoint-N` that `transformers.trainer_utils.get_last_checkpoint` would still pick, so every resume failed until
the training was thrown away; here such folders are set aside (`incomplete-checkpoint-N`, a name the Trainer's own
checkpoint globbing never matches) with a one-line note, and the newest complete one is used.

Ctrl-C (SIGINT) during training (`SaveOnInterrupt`, given to every trainer of a stage) ends the current step, saves a
checkpoint and stops with a one-line `TrainingInterrupted`, so `--resume` (or the same build again) goes on from
there instead of from the last periodic checkpoint; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
ASIDE = "incomplete-"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def is_complete(folder: Path) -> bool:
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((folder / name).is_file() for name in WEIGHTS)


def last_complete_checkpoint(out: str | Path, log=print) -> str | None:
    """The newest complete `checkpoint-N` in `out`; newer incomplete ones are renamed aside, said in one line."""
    out = Path(out)
    if not out.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in out.iterdir()
                   if p.is_dir() and (m := re.fullmatch(rf"{PREFIX}-(\d+)", p.name)))
    for _, folder in reversed(found):
        if is_complete(folder):
            return str(folder)
        aside = folder.with_name(ASIDE + folder.name)
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
        log(f"{folder} is incomplete (interrupted save): set aside as {aside.name}; resuming from an earlier one")
    return None


def drop_checkpoints(out: str | Path) -> None:
    """Delete every checkpoint of a finished run (and any set aside)."""
    for folder in list(Path(out).glob(f"{PREFIX}-*")) + list(Path(out).glob(f"{ASIDE}{PREFIX}-*")):
        shutil.rmtree(folder, ignore_errors=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the checkpoint of the step it ended on was saved (the message names it)."""


class SaveOnInterrupt(TrainerCallback):
    """The first SIGINT is noted (not raised); at the end of the step the trainer saves a checkpoint and stops, and
    `on_train_end` raises `TrainingInterrupted`. Every process of a distributed run stops at the same step: the
    flag is reduced across processes at each step end (one scalar)."""

    def __init__(self):
        self.interrupted = False
        self.previous = None

    def _handler(self, signum, frame):
        if self.interrupted:  # the second Ctrl-C: no waiting for the step
            signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.interrupted = True
        os.write(2, b"\ninterrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop at once)\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)

    def _any_interrupted(self, args) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.interrupted
        flag = torch.tensor(float(self.interrupted), device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_interrupted(args):
            self.interrupted = True
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
        if self.interrupted:
            saved = Path(args.output_dir) / f"{PREFIX}-{state.global_step}"
            raise TrainingInterrupted(f"interrupted at step {state.global_step} of {state.max_steps}; "
                                      f"checkpoint saved in {str(saved)!r}")
