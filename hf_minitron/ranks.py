"""Who writes a run folder: one build at a time (`lock_file`, a flock), and in a build under `accelerate launch`
one process of it, the main one.

`accelerate launch --num_processes N -m hf_minitron.cli build ...` runs the whole build in every process: the
training (search candidates, distillation, SFT, teacher correction) and the teacher's passes (importance, teacher
logits) are split across the processes by the Trainer and by those stages themselves, while every write to the run
folder (manifest, recipe copy, pruned weights, search results, evaluation, cards, family report, publishing) is done
by the main process alone, the others waiting in `on_main`. Every decision that steers a collective (skip, resume
or redo a stage; the search's scores) is the main process's, sent to the others, so they all take the same path.

The waits use their own gloo group whose timeout is `HF_MINITRON_WAIT_TIMEOUT` seconds (24 h by default): the
main process may evaluate or publish alone for hours, far past the process group's 30 minutes. A main process
that dies is not waited for that long: the launcher stops the others at once.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from .utils import first_line

WAIT_TIMEOUT_ENV = "HF_MINITRON_WAIT_TIMEOUT"
DEFAULT_WAIT_TIMEOUT = 24 * 3600  # seconds
_started: dict = {}  # "state": accelerate's PartialState, "group": the waits' gloo group (several processes only)


class MainProcessError(RuntimeError):
    """What another process raises when the main one failed in work it did alone; the main process prints the error
    itself, so the others exit quietly (`cli.main`)."""


def _uses_cpu() -> bool:
    """Whether the processes are CPU ones (gloo): ACCELERATE_USE_CPU=1, or no GPU. accelerate's PartialState needs
    to be told, or a CPU launch falls back to N unrelated single processes."""
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def wait_timeout() -> timedelta:
    raw = os.environ.get(WAIT_TIMEOUT_ENV, str(DEFAULT_WAIT_TIMEOUT))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ValueError(f"{WAIT_TIMEOUT_ENV}={raw!r}: give the seconds other processes wait for the main one (> 0)")
    return timedelta(seconds=seconds)


def start():
    """Join the launch's processes (a no-op in a plain process): accelerate's PartialState, each process on its own
    device, plus the gloo group the waits use. Called by every process at the same point, before any other helper."""
    from accelerate import PartialState

    timeout = wait_timeout()
    state = PartialState(cpu=_uses_cpu())
    _started["state"] = state
    if state.num_processes > 1 and "group" not in _started:
        import torch.distributed as dist

        _started["group"] = dist.new_group(backend="gloo", timeout=timeout)
    return state


def world() -> int:
    """How many processes run the build (1 before `start`)."""
    return _started["state"].num_processes if "state" in _started else 1


def index() -> int:
    return _started["state"].process_index if "state" in _started else 0


def is_main() -> bool:
    return index() == 0


def _broadcast(payload: list) -> list:
    import torch.distributed as dist

    dist.broadcast_object_list(payload, src=0, group=_started["group"])
    return payload


def on_main(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on the main process while the others wait; its result (pickled) is returned on every
    process. When it raises, the main process raises that error and the others a `MainProcessError` naming it.
    Inside another `on_main` (the others already waiting) it is a plain call."""
    if world() == 1 or _started.get("alone"):
        return fn(*args, **kwargs)
    payload: list = [None]
    error = None
    if is_main():
        _started["alone"] = True
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except Exception as e:  # the others must not wait for a result that never comes
            error = e
            payload = [("error", f"{type(e).__name__}: {first_line(e)}")]
        finally:
            _started.pop("alone", None)
    status, value = _broadcast(payload)[0]
    if error is not None:
        raise error
    if status == "error":
        raise MainProcessError(f"the main process failed: {value}")
    return value


def main_first(fn, *args, **kwargs):
    """`fn` in the main process, then in the others (a download lands in the shared cache once); each process
    gets its own result."""
    held = {}

    def first() -> None:
        held["result"] = fn(*args, **kwargs)

    on_main(first)
    return held["result"] if is_main() else fn(*args, **kwargs)


def sum_across(values: list[float]) -> list[float]:
    """Each value summed over the processes (float64, the same result on every process)."""
    if world() == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=_started["group"])
    return t.tolist()


def finish() -> None:
    """End the launch's process group, every process at the same point once its work is done (a no-op in a plain
    process). A gloo or NCCL group left to the interpreter's exit is torn down by static destructors while its
    threads still run: torch warns, and a rank can abort ("terminate called without an active exception") after a
    run that succeeded."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier(group=_started.get("group"))  # the waits' group when started (its long timeout): no process tears
    dist.destroy_process_group()  # down a group another one still uses; this ends every group, the waits' too
    _started.clear()


def main_log(log):
    """`log` on the main process, nothing on the others: a line of the build is printed once."""
    return log if is_main() else (lambda *args, **kwargs: None)


# ---- one build per run folder ----


class RunLockedError(ValueError):
    pass


def lock_file(path: Path, what: str):
    """An exclusive lock on `path` (`flock`, so a dead holder's lock is free again at once); the holder's PID and
    host are written in it, and named in the one-line error a second holder gets. Taken by the main process only."""
    import fcntl
    import socket

    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(f"{what} is in use by {holder}; wait for that build to finish, or build into another "
                             f"--out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    handle.flush()
    return handle
