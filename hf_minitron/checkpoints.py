"""Trainer checkpoints of a run folder: find the newest complete one to resume from, drop them when done.

A checkpoint is complete once `trainer_state.json` (the Trainer writes it after the weights, optimizer, scheduler
and RNG states) is there and parses, next to weights. A kill or a full disk during a save leaves an incomplete
`checkpoint-N` that `transformers.trainer_utils.get_last_checkpoint` would still pick, so every resume failed until
the training was thrown away; here such folders are set aside (`incomplete-checkpoint-N`, a name the Trainer's own
checkpoint globbing never matches) with a one-line note, and the newest complete one is used.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

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
