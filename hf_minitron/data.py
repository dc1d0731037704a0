"""Text from any `datasets` source, packed into fixed-length token sequences.

A source is one of:
- a local file, folder or glob of `.txt` / `.jsonl` / `.json` / `.parquet` / `.csv` (several joined with `,`);
- `pydoc-topics`: the Python language reference shipped inside CPython (about 110K tokens of English prose,
  present on every machine, no download);
- a Hub dataset id, with `config`, `split` and optional streaming.
"""

from __future__ import annotations

import glob
import hashlib
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

BUILTIN_PYDOC = "pydoc-topics"
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataSourceError(ValueError):
    pass


@dataclass
class TextSource:
    """One text data source and how to read it."""

    path: str
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    revision: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _local_files(path: str) -> list[str] | None:
    """Files named by a path, folder, glob or comma list; None when it does not look local."""
    parts = [p.strip() for p in path.split(",") if p.strip()]
    files: list[str] = []
    for part in parts:
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found = sorted(f for f in glob.glob(os.path.join(part, "**", "*"), recursive=True)
                           if os.path.splitext(f)[1] in _BUILDERS)
        elif any(ch in part for ch in "*?["):
            found = sorted(glob.glob(part, recursive=True))
        elif os.path.exists(part):
            found = [part]
        elif part.startswith((".", "/", "~")) or os.path.splitext(part)[1] in _BUILDERS:
            raise DataSourceError(f"data file {part!r} does not exist")
        else:
            return None
        if not found:
            raise DataSourceError(f"data path {part!r} matches no files")
        files += found
    return files


def load_text_dataset(source: TextSource | str):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) with the text in `source.text_column`."""
    import datasets

    if isinstance(source, str):
        source = TextSource(source)
    if source.path == BUILTIN_PYDOC:
        from pydoc_data.topics import topics

        return datasets.Dataset.from_dict({source.text_column: [topics[k] for k in sorted(topics)]})
    files = _local_files(source.path)
    try:
        if files is not None:
            kinds = {os.path.splitext(f)[1] for f in files}
            unknown = kinds - set(_BUILDERS)
            if unknown or len({_BUILDERS[k] for k in kinds}) != 1:
                raise DataSourceError(f"data files of kinds {sorted(kinds)} in {source.path!r}: give one kind of "
                                      f"{', '.join(_BUILDERS)}")
            builder = _BUILDERS[kinds.pop()]
            extra = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=source.streaming, **extra)
        else:
            ds = _load_hub_dataset(source)
    except DataSourceError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs the source and the first line
        raise DataSourceError(f"cannot read data source {source.path!r}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    columns = ds.column_names
    if columns is not None and source.text_column not in columns:
        raise DataSourceError(f"data source {source.path!r} has no column {source.text_column!r}; "
                              f"columns: {', '.join(columns)}")
    return ds


def _load_hub_dataset(source: TextSource):
    """A Hub dataset id through `datasets`; offline, from a snapshot already in the huggingface_hub cache."""
    import datasets
    from huggingface_hub import constants, snapshot_download

    kwargs = {"split": source.split, "streaming": source.streaming}
    if not constants.HF_HUB_OFFLINE:
        return datasets.load_dataset(source.path, source.config, revision=source.revision, **kwargs)
    try:
        folder = snapshot_download(source.path, repo_type="dataset", revision=source.revision, local_files_only=True)
    except Exception as e:
        raise DataSourceError(f"dataset {source.path!r} is not in the local HF cache and HF_HUB_OFFLINE is set") from e
    return datasets.load_dataset(folder, source.config, **kwargs)


@contextmanager
def iterate_rows(ds):
    """Iterate a dataset; close the iterator when leaving early, so a streaming reader is shut down now and not
    at interpreter exit, where Arrow's parquet scanner threads can abort the process (datasets#7566, arrow#45214)."""
    import gc

    rows = iter(ds)
    try:
        yield rows
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
        del rows
        gc.collect()  # join the scanner's threads while Arrow is still alive


@dataclass
class PackedData:
    """`samples` token sequences of `seq_len`, packed from documents joined by EOS."""

    input_ids: torch.Tensor  # [samples, seq_len] int64
    source: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()


def pack_tokens(source: TextSource | str, tokenizer, samples: int, seq_len: int, seed: int = 0,
                max_tokens: int | None = None) -> PackedData:
    """Tokenize documents, join them with EOS, cut into `seq_len` windows and pick `samples` of them.

    Non-streaming sources are tokenized whole (up to `max_tokens`) and windows are chosen at random (seeded)
    across the corpus, so calibration sees all of it; streaming sources take the first windows.
    """
    if samples < 1 or seq_len < 2:
        raise DataSourceError(f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    src = TextSource(source) if isinstance(source, str) else source
    ds = load_text_dataset(src)
    sep = tokenizer.eos_token_id
    if sep is None:
        raise DataSourceError("tokenizer has no EOS token to separate packed documents")
    needed = samples * seq_len
    budget = max_tokens or (needed if src.streaming else None)
    ids: list[int] = []
    with iterate_rows(ds) as rows:
        for row in rows:
            text = row[src.text_column]
            if not text:
                continue
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.append(sep)
            if budget is not None and len(ids) >= budget:
                break
    windows = len(ids) // seq_len
    if windows < samples:
        raise DataSourceError(f"data source {src.path!r} gives {len(ids)} tokens: {windows} windows of {seq_len}, "
                              f"fewer than the {samples} samples asked for")
    all_windows = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    if windows > samples and not src.streaming:
        pick = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
        chosen = all_windows[pick]
    else:
        chosen = all_windows[:samples]
    meta = {**src.as_dict(), "samples": samples, "seq_len": seq_len, "seed": seed, "corpus_tokens": len(ids)}
    packed = PackedData(chosen.contiguous(), meta)
    packed.source["sha256"] = packed.sha256
    return packed


def text_windows(path: str, tokenizer, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of a text corpus, in order (for perplexity evaluation)."""
    ds = load_text_dataset(TextSource(path))
    ids: list[int] = []
    need = None if max_windows is None else max_windows * seq_len
    with iterate_rows(ds) as rows:
        for row in rows:
            ids.extend(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
            if need is not None and len(ids) >= need:
                break
    n = len(ids) // seq_len if max_windows is None else min(max_windows, len(ids) // seq_len)
    if n == 0:
        raise DataSourceError(f"{path!r} has fewer than {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
