"""Small helpers shared by several modules, kept here so that each exists once (no torch import)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def si(x: int | float | None, missing: str = "-") -> str:
    """1234567 -> '1.23M': parameters, tokens and FLOPs in tables, cards and logs; `missing` for None."""
    if x is None:
        return missing
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def sha256_file(path: str | Path, h=None) -> str:
    """sha256 of a file's bytes (read in blocks, so weights never sit in memory); `h` continues a running hash."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path) -> dict | list | None:
    """The parsed file, or None when it does not exist; a broken file is an error that names it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {first_line(e)}") from e


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type when the message is empty), for one-line reports."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def warn(message: str) -> None:
    """A one-line warning on stderr (not `warnings`, whose source-line echo the user cannot act on)."""
    import sys

    print(f"hf-minitron: warning: {message}", file=sys.stderr)


def check_writable(path: str | Path, folder: bool = True) -> Path:
    """Fail now, in one line, when an output (a folder, or a file when `folder` is False) cannot be written: a file
    where a folder is wanted (or the reverse), or a location this process may not write to (tried with a probe file
    in the nearest existing folder, which also catches read-only mounts and root-owned folders)."""
    import tempfile

    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kinds = ("a folder", "a file") if folder else ("a file", "a folder")
        raise ValueError(f"{str(path)!r} is {kinds[1]}; give {kinds[0]}")
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{str(path)!r} cannot be created: {str(probe)!r} is a file")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise ValueError(f"{str(path)!r} is not writable: no file can be created in {str(probe)!r} "
                         f"({e.strerror or first_line(e)})") from None
    return path

