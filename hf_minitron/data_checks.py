"""One-line diagnoses of data that cannot be used, each naming the source (and the file and line) before
`datasets` or the trainer fails on it with a generic message or a traceback."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")  # the local file kinds data.py reads


class DataSourceError(ValueError):
    pass


def looks_local(path: str) -> bool:
    """A path no Hub dataset id can be (ids are `name` or `org/name`): it is missing, not to be downloaded."""
    return (path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1
            or os.path.splitext(path)[1] in TEXT_SUFFIXES)


def check_file(path: str) -> None:
    """An empty or binary text file, named in one line before `datasets` fails on it with a generic message."""
    if path.endswith(".parquet"):
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise DataSourceError(f"data file {path!r} is empty")
    try:
        head[:-4].decode("utf-8")  # the last bytes may cut a character in two
    except UnicodeDecodeError:
        raise DataSourceError(f"data file {path!r} is not UTF-8 text (binary?)") from None
    if b"\0" in head:
        raise DataSourceError(f"data file {path!r} is not UTF-8 text (binary?)")


def bad_json_line(files: list[str]) -> str | None:
    """The first file and line of JSON Lines that do not parse (read only after `datasets` failed on them)."""
    import json

    for path in files:
        if not path.endswith(".jsonl"):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    return f"data file {path!r} line {n} is not valid JSON: {e}"
                if not isinstance(row, dict):
                    return f"data file {path!r} line {n} is not a JSON object"
    return None


def check_text(ds, name: str, col: str) -> None:
    """A text column that holds no text (numbers, nulls, only empty strings) fails here, in one line, and not deep
    inside the trainer's tokenisation. A streamed source is not read ahead for it."""
    import datasets
    import pyarrow.compute as pc

    feature = (ds.features or {}).get(col)
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
        raise DataSourceError(f"column {col!r} of data source {name!r} holds {feature.dtype} values, not text")
    if isinstance(ds, datasets.Dataset) and isinstance(feature, datasets.Value):
        longest = pc.max(pc.utf8_length(ds.data.column(col))).as_py() if len(ds) else None
        if not longest:
            raise DataSourceError(f"column {col!r} of data source {name!r} has no text "
                                  f"({'no rows' if not len(ds) else 'every row is empty'})")


@contextmanager
def quiet_json_builder():
    """Mute the `datasets` JSON builder's error log (a traceback per bad file) while it reads; its exception still
    reaches the caller, which says it in one line."""
    log = logging.getLogger("datasets.packaged_modules.json.json")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
