"""Text from any `datasets` source, packed into fixed-length token sequences.

A source is one of:
- a local file, folder or glob of `.txt` / `.jsonl` / `.json` / `.parquet` / `.csv` (several joined with `,`);
- `pydoc-topics`: the Python language reference shipped inside CPython (about 110K tokens of English prose,
  present on every machine, no download);
- a Hub dataset id, with `config`, `split` and optional streaming.

Every token stream (calibration packing, build and `eval` perplexity, search scoring) comes from `token_ids`, so they
all share one convention: EOS after every document, and every window starting with BOS when the tokenizer adds one
itself (`window_bos`). SFT data goes through the same source handling.
"""

from __future__ import annotations

import glob
import hashlib
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from .data_checks import DataSourceError, bad_json_line, check_file, check_text, looks_local, quiet_json_builder
from .schema import SettingError

BUILTIN_PYDOC = "pydoc-topics"
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TextSource:
    """One text data source and how to read it; in a recipe, a plain string is its path."""

    path: str = field(metadata={
        "help": "text source: local .txt/.jsonl/.json/.parquet/.csv files, folders or globs (comma-separated), "
                "'pydoc-topics' (CPython's language reference, no download), or a Hub dataset id"})
    config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    text_column: str = field(default="text", metadata={
        "help": "column holding the text (for SFT data: the conversations, renamed to messages)"})
    streaming: bool = field(default=False, metadata={"help": "stream the dataset instead of downloading it whole"})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset branch, tag or commit"})

    @classmethod
    def from_string(cls, path: str) -> "TextSource":
        return cls(path)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DataSources:
    """Sources per stage; `holdout` is the share of documents (from the end) kept out of training whenever the
    evaluation source is the same as the distillation source, so search and evaluation score unseen text
    (calibration reads the whole source: forward passes only, nothing is fitted to it)."""

    calibration: TextSource | None = None  # each a `datasets` source; a plain string is its path
    distillation: TextSource | None = None
    sft: TextSource | None = None
    evaluation: TextSource | None = None
    holdout: float = 0.1

    def check(self, needs_sft: bool) -> None:
        """What each stage needs is there; a one-line error naming the recipe key otherwise."""
        for ok, message in ((0 <= self.holdout < 1, f"data.holdout: must be in [0, 1), got {self.holdout}"),
                            (self.calibration is not None, "data.calibration: missing (text for importance scoring)"),
                            (self.distillation is not None, "data.distillation: missing (text for distillation)"),
                            (self.sft is not None or not needs_sft, "data.sft: missing, but a member is instruct")):
            if not ok:
                raise SettingError(message)

    @property
    def eval_source(self) -> TextSource | None:
        return self.evaluation or self.distillation

    @property
    def eval_holdout(self) -> float:
        """The held-out share evaluation reads: only when it reads the distillation text itself."""
        a, b = self.eval_source, self.distillation
        keys = ("path", "config", "split", "text_column", "revision")
        same = a is not None and b is not None and all(getattr(a, k) == getattr(b, k) for k in keys)
        return self.holdout if same and not b.streaming else 0.0


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
        elif looks_local(part):
            raise DataSourceError(f"data file {part!r}: no such file or folder")
        else:
            return None
        if not found:
            raise DataSourceError(f"data path {part!r} matches no files")
        files += found
    return files


def _load_source(source: TextSource):
    """The dataset a source names, before any column check (shared by text and SFT data)."""
    import datasets

    if source.path == BUILTIN_PYDOC:
        from pydoc_data.topics import topics

        return datasets.Dataset.from_dict({source.text_column: [topics[k] for k in sorted(topics)]})
    files = _local_files(source.path)
    try:
        if files is None:
            return _load_hub_dataset(source)
        kinds = {os.path.splitext(f)[1] for f in files}
        unknown = kinds - set(_BUILDERS)
        if unknown or len({_BUILDERS[k] for k in kinds}) != 1:
            raise DataSourceError(f"data files of kinds {sorted(kinds)} in {source.path!r}: give one kind of "
                                  f"{', '.join(_BUILDERS)}")
        builder = _BUILDERS[kinds.pop()]
        for f in files:
            check_file(f)
        extra = {"sample_by": "document"} if builder == "text" else {}
        with quiet_json_builder():  # its own traceback in the log; the error below names the file and line
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=source.streaming,
                                         **extra)
    except DataSourceError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs the source and the first line
        bad = bad_json_line(files or [])
        if bad:
            raise DataSourceError(bad) from e
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise DataSourceError(f"cannot read data source {source.path!r}: {first}") from e


def _as_source(source: TextSource | str) -> TextSource:
    return TextSource(source) if isinstance(source, str) else source


def load_text_dataset(source: TextSource | str):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) with the text in `source.text_column`."""
    source = _as_source(source)
    ds = _load_source(source)
    columns = ds.column_names
    if columns is not None and source.text_column not in columns:
        raise DataSourceError(f"data source {source.path!r} has no column {source.text_column!r}; "
                              f"columns: {', '.join(columns)}")
    check_text(ds, source.path, source.text_column)
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
        raise DataSourceError(f"dataset {source.path!r} is neither a local file or folder nor in the local HF cache "
                              "(HF_HUB_OFFLINE is set)") from e
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
    """`samples` token sequences of `seq_len`, packed from documents each followed by EOS."""

    input_ids: torch.Tensor  # [samples, seq_len] int64
    source: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()


def holdout_count(num_rows: int, share: float) -> int:
    """Documents held out from the end: at least one when `share` > 0, none for a one-document source."""
    return max(1, int(num_rows * share)) if share > 0 and num_rows > 1 else 0


def split_holdout(ds, share: float):
    """(train, heldout): the last `holdout_count` documents held out; heldout is None when nothing is held out.

    Streaming datasets have no length, so they are never split.
    """
    import datasets

    k = 0 if isinstance(ds, datasets.IterableDataset) else holdout_count(len(ds), share)
    if not k:
        return ds, None
    return ds.select(range(len(ds) - k)), ds.select(range(len(ds) - k, len(ds)))


def _document_ids(rows, column: str, tokenizer, budget: int | None) -> list[int]:
    """Documents in order, each followed by EOS, until `budget` tokens are reached (the last one kept whole)."""
    sep = tokenizer.eos_token_id
    if sep is None:
        raise DataSourceError("tokenizer has no EOS token to end each document")
    ids: list[int] = []
    with iterate_rows(rows) as it:
        for row in it:
            text = row[column]
            if not text:
                continue
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.append(sep)
            if budget is not None and len(ids) >= budget:
                break
    return ids


def token_ids(source: TextSource | str, tokenizer, max_tokens: int | None = None, rows=None) -> torch.Tensor:
    """Token ids [N] of a source's documents in order, EOS after every document, cut to `max_tokens`.

    `rows` is an already selected dataset of the source (such as its held-out tail); by default the whole source.
    """
    src = _as_source(source)
    ids = _document_ids(load_text_dataset(src) if rows is None else rows, src.text_column, tokenizer, max_tokens)
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def window_bos(tokenizer) -> int | None:
    """The BOS id every window starts with: the tokenizer's, when it adds one itself (Llama 3, Gemma); else None.

    Windows are cut from the middle of the token stream; a BOS-sensitive model sees position 0 differently
    (attention sink), so a window without one distorts both calibration activations and perplexity.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _cut(ids: list[int] | torch.Tensor, seq_len: int, bos: int | None) -> torch.Tensor:
    """Consecutive windows [n, seq_len] of `ids`: seq_len tokens each, or BOS + seq_len - 1 tokens."""
    body = seq_len - (bos is not None)
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = len(ids) // body
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def pick_windows(windows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` of `windows` drawn at random (seeded), in corpus order: calibration and caches see all of a corpus."""
    if len(windows) <= n:
        return windows
    return windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n].sort().values]


def token_windows(source: TextSource | str, tokenizer, seq_len: int, windows: int | None = None,
                  stride: int | None = None, holdout: float = 0.0, cache: dict | None = None) -> torch.Tensor:
    """The evaluation tokens of a source, for perplexity and search scoring alike, so their figures compare.

    Reads the held-out tail of the source when `holdout` > 0 (see `split_holdout`). With `stride` None or
    `seq_len`: the first `windows` (all when None) consecutive non-overlapping windows, [n, seq_len], each
    starting with BOS when the tokenizer adds one (`window_bos`). With `stride` < `seq_len`: the flat ids [N] that
    `evaluate.sliding_perplexity(model, ids, seq_len, stride)` scores, enough for `windows` windows moved by
    `stride` (all when None), with that BOS only at the start of the stream. `cache`: a dict shared by callers
    that use one tokenizer (a build scores every model on the same windows), so a source is read and tokenized once.
    """
    src = _as_source(source)
    stride = stride or seq_len
    key = ("token_windows", *asdict(src).values(), seq_len, windows, stride, holdout)
    if cache is not None and key in cache:
        return cache[key]
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise DataSourceError(f"need seq_len >= 2 and stride in 1..seq_len, got seq_len={seq_len}, stride={stride}")
    rows = None
    if holdout > 0:
        whole = load_text_dataset(src)
        tail = split_holdout(whole, holdout)[1]
        rows = whole if tail is None else tail
    bos = window_bos(tokenizer)
    body = seq_len - (bos is not None)  # tokens of text per window
    if windows is None:
        need = None
    else:
        need = windows * body if stride == seq_len else (windows - 1) * stride + body
    ids = token_ids(src, tokenizer, need, rows=rows)
    if len(ids) < body:
        part = " (held-out part)" if holdout > 0 else ""
        raise DataSourceError(f"data source {src.path!r}{part} has {len(ids)} tokens, fewer than one window "
                              f"of {seq_len}")
    if stride == seq_len:
        ids = _cut(ids, seq_len, bos)
    elif bos is not None:
        ids = torch.cat([torch.tensor([bos], dtype=torch.long), ids])
    if cache is not None:
        cache[key] = ids
    return ids


STREAM_SHUFFLE_BUFFER = 10_000  # documents; a streamed source is shuffled through a seeded buffer of this size


def pack_tokens(source: TextSource | str, tokenizer, samples: int, seq_len: int, seed: int = 0,
                max_tokens: int | None = None, shuffle_buffer: int = STREAM_SHUFFLE_BUFFER) -> PackedData:
    """Tokenize documents (EOS after each, as `token_ids`), cut into `seq_len` windows, pick `samples` of them.

    Non-streaming sources are tokenized whole (up to `max_tokens`) and windows are chosen at random (seeded)
    across the corpus, so calibration sees all of it. Streaming sources cannot be read whole: their shards and
    documents are shuffled (`IterableDataset.shuffle(seed, buffer_size=shuffle_buffer)`) and the first windows of
    the shuffled stream are taken, not the first windows of the first shard. Every window starts with BOS when the
    tokenizer adds one (`window_bos`), still `seq_len` tokens long.
    """
    if samples < 1 or seq_len < 2:
        raise DataSourceError(f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    src = _as_source(source)
    bos = window_bos(tokenizer)
    body = seq_len - (bos is not None)
    budget = max_tokens or (samples * body if src.streaming else None)
    ds = load_text_dataset(src)
    if src.streaming:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    # not cut to the budget: the last document stays whole, so the window count (and the seeded pick) is as before
    ids = _document_ids(ds, src.text_column, tokenizer, budget)
    all_windows = _cut(ids, seq_len, bos)
    windows = len(all_windows)
    if windows < samples:
        raise DataSourceError(f"data source {src.path!r} gives {len(ids)} tokens: {windows} windows of {seq_len}, "
                              f"fewer than the {samples} samples asked for")
    chosen = all_windows[:samples] if src.streaming else pick_windows(all_windows, samples, seed)
    meta = {**src.as_dict(), "samples": samples, "seq_len": seq_len, "seed": seed, "corpus_tokens": len(ids),
            "bos": bos}
    if src.streaming:
        meta["shuffle_buffer"] = shuffle_buffer
    packed = PackedData(chosen.contiguous(), meta)
    packed.source["sha256"] = packed.sha256
    return packed


# ---- supervised fine-tuning data -----------------------------------------------------------------------------------
def alpaca_to_conversations(rows) -> list[dict]:
    """Alpaca seed tasks -> one conversation per (task, instance): user = instruction (+ input), assistant = output."""
    convs = []
    for row in rows:
        for inst in row["instances"]:
            user = row["instruction"].strip()
            if (inst.get("input") or "").strip():  # `datasets` fills an absent input with None
                user += "\n\n" + inst["input"].strip()
            convs.append({"messages": [{"role": "user", "content": user},
                                       {"role": "assistant", "content": inst["output"].strip()}]})
    return convs


def _alpaca_batch(batch: dict) -> dict:
    rows = (dict(zip(batch, values)) for values in zip(*batch.values()))
    return {"messages": [c["messages"] for c in alpaca_to_conversations(rows)]}


def load_sft_dataset(source: TextSource | str):
    """Chat data with a `messages` column or `prompt`+`completion` columns, read like any text source.

    `source` is a `TextSource`, a path or Hub id, or an already loaded dataset. Alpaca seed tasks (`instruction` +
    `instances`) become conversations; a `text_column` other than "text" names the column holding the conversations.
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        src, ds = None, source
    else:
        src = _as_source(source)
        ds = _load_source(src)
    name = repr(src.path) if src else "given dataset"
    cols = ds.column_names or []
    if {"instruction", "instances"} <= set(cols):
        ds = ds.map(_alpaca_batch, batched=True, remove_columns=cols)
    elif src and src.text_column != "text" and src.text_column in cols and src.text_column != "messages":
        ds = ds.remove_columns([c for c in cols if c == "messages"]).rename_column(src.text_column, "messages")
    cols = ds.column_names
    if cols is not None and "messages" not in cols and not {"prompt", "completion"} <= set(cols):
        raise DataSourceError(f"SFT data {name} needs a 'messages' column or 'prompt' and 'completion' columns; "
                              f"columns: {', '.join(cols)}")
    return ds
