"""Teacher-logit cache: run the teacher once over the distillation windows, distil any number of students from disk.

A cache folder holds `teacher_cache.json` (what it was computed from: teacher, tokenizer, data, K, temperature,
window length; counts and bytes per token) and Arrow shards (`shard-NNNNN.arrow`, `datasets.Dataset.from_file` or
`load_dataset("arrow", ...)`), one row per window: `input_ids` [L], and for each of the L - 1 scored positions the
teacher's top-K ids (uint16 when the vocabulary fits), their log-probs and the log of the remaining tail mass
(float16 by default); with `top_p`, each position keeps only the fewest of its top-K that reach P (`topk_counts`
says how many). `distill` with `teacher_cache` trains on exactly these windows (`cached_distill.py`) with the sparse
forward KL of `losses.chunked_sparse_losses`, never loading the teacher. Shards are written to a temporary name and
renamed, so a killed writer resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .archs import logit_transform
from .losses import check_loss_name

META_FILE = "teacher_cache.json"
SHARD = "shard-{:05d}.arrow"
FORMAT = 1
LogProbDtype = Literal["float16", "float32"]


@dataclass
class TeacherCacheConfig:
    """`hf-minitron teacher-logits` flags: which tokens to run the teacher on and what to keep per token."""

    max_tokens: int | None = field(default=None, metadata={
        "help": "tokens of text to cache (e.g. 20M): max_tokens // seq_len windows of the data (see seed)"})
    seed: int | None = field(default=42, metadata={
        "help": "draw the windows at random with this seed from all of a non-streamed source's windows (what a "
                "shuffled distillation run meets); none: its first windows in order (a stream: always its first)"})
    seq_len: int = field(default=1024, metadata={
        "help": "tokens per window (distill's max_length; a distill run from the cache uses the cache's)"})
    top_k: int = field(default=512, metadata={
        "help": "teacher log-probs kept per token (its K most likely tokens, plus one bucket for the rest); "
                "bench/RESULTS.md: after equal KD budgets, K 8/32/128/512 cost +7.0/+4.9/+2.6/+0.9% held-out "
                "perplexity against full KD, so 512"})
    top_p: float | None = field(default=None, metadata={
        "help": "keep per token only the fewest of its top-K whose probabilities add up to P (e.g. 0.99; at least "
                "one), the rest joining the tail bucket: confident tokens then take a few entries, not K; "
                "none: always K"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature of the cached log-probs; distill from the cache must use the same"})
    logprob_dtype: LogProbDtype = field(default="float16", metadata={
        "help": "storage dtype of the log-probs and the tail (float16: 2 bytes each)"})
    batch_size: int = field(default=8, metadata={"help": "windows per teacher forward pass"})
    shard_windows: int = field(default=256, metadata={
        "help": "windows per shard file (the unit of resuming)"})
    chunk_tokens: int = field(default=1024, metadata={
        "help": "tokens per chunk of the teacher's LM head (peak memory ~ chunk x vocab)"})

    def __post_init__(self):
        check_loss_name(self.logprob_dtype, typing.get_args(LogProbDtype), "logprob_dtype")
        for name in ("seq_len", "top_k", "batch_size", "shard_windows", "chunk_tokens"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise ValueError(f"teacher cache {name} must be positive (seq_len >= 2), got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"teacher cache top_p must be in (0, 1], got {self.top_p}")


# ---- identities: what a cache was computed from ------------------------------------------------------------------
def tokenizer_hash(tokenizer) -> str:
    """The vocabulary and the special tokens that shape the windows (EOS after each document, BOS per window)."""
    from .data import window_bos

    items = sorted(tokenizer.get_vocab().items())
    return _sha([items, tokenizer.eos_token_id, window_bos(tokenizer)])


def teacher_identity(teacher) -> dict:
    """A model spec / `ModelSource`: its record (source, revision, commit, weight-file fingerprint); a loaded model:
    its name and a hash of its parameters."""
    from .models import ModelSource, resolve_source

    if isinstance(teacher, str):
        teacher = resolve_source(teacher)
    if isinstance(teacher, ModelSource):
        return {**teacher.record(), "kind": "files"}
    h = hashlib.sha256()
    for name, p in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return {"source": teacher.name_or_path, "weights": h.hexdigest(), "kind": "parameters"}


def data_identity(data, text_column: str = "text") -> dict:
    """A text source (path, split, column; sizes and sampled bytes of local files) or a `datasets` dataset (its
    fingerprint): enough to refuse a cache of other text without reading the text."""
    from .data import BUILTIN_PYDOC, TextSource, _local_files

    if not isinstance(data, (str, TextSource)):
        return {"source": "dataset", "text_column": text_column, "hash": data._fingerprint}
    src = TextSource(data, text_column=text_column) if isinstance(data, str) else data
    keys = {k: v for k, v in asdict(src).items() if k != "streaming"}
    if src.path == BUILTIN_PYDOC:
        from pydoc_data.topics import topics

        return {**keys, "hash": _sha(sorted(topics.items()))}
    files = _local_files(src.path) or []
    h = hashlib.sha256()
    for path in files:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            for at in (0, size // 2, max(size - (1 << 16), 0)):
                f.seek(at)
                h.update(f.read(1 << 16))
    return {**keys, "hash": _sha(keys) if not files else h.hexdigest()}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def same_teacher(a: dict, b: dict) -> bool:
    if a.get("kind") == b.get("kind") and a.get("weights") and b.get("weights"):
        return a["weights"] == b["weights"]
    return a.get("source") == b.get("source")


# ---- writing --------------------------------------------------------------------------------------------------
def cache_windows(data, tokenizer, seq_len: int, max_tokens: int | None, text_column: str = "text",
                  seed: int | None = None) -> torch.Tensor:
    """[n, seq_len] windows of the data's documents (EOS after each, BOS first when the tokenizer adds one),
    n = max_tokens // seq_len: with `seed`, n of all the windows of a non-streamed source drawn at random (as a
    shuffled distillation run would meet them, not only the corpus's first part), in corpus order; else (or for a
    stream) the first n."""
    from .data import DataSourceError, TextSource, _cut, pick_windows, token_ids, window_bos

    bos = window_bos(tokenizer)
    body = seq_len - (bos is not None)
    n = None if max_tokens is None else max(max_tokens // seq_len, 1)
    src = data if isinstance(data, TextSource) else TextSource(data if isinstance(data, str) else "dataset",
                                                               text_column=text_column)
    sample = seed is not None and n is not None and not src.streaming
    need = None if n is None or sample else n * body
    ids = token_ids(src, tokenizer, need, rows=None if isinstance(data, (str, TextSource)) else data)
    windows = _cut(ids, seq_len, bos)
    if len(windows) < 1:
        raise DataSourceError(f"the data gives {len(ids)} tokens, fewer than one window of {seq_len}")
    return pick_windows(windows, n, seed) if sample else windows


def _id_type(vocab: int):
    import pyarrow as pa

    return (pa.uint16(), np.uint16) if vocab <= 1 << 16 else (pa.uint32(), np.uint32)


@torch.no_grad()
def teacher_top_k(teacher, input_ids: torch.Tensor, k: int, temperature: float = 1.0, chunk_tokens: int = 1024):
    """(ids [B, L-1, K], log-probs [B, L-1, K], log tail mass [B, L-1]) of the teacher's next-token distributions at
    the scored positions of `input_ids` [B, L], at `temperature`; the LM head runs per chunk of tokens. Entries come
    most likely first (`top_p_counts` keeps a prefix)."""
    dev = teacher.device
    out = teacher(input_ids=input_ids.to(dev), use_cache=False, output_hidden_states=True,
                  logits_to_keep=torch.empty(0, dtype=torch.long, device=dev))
    h = out.hidden_states[-1][:, :-1]
    del out
    b, n = h.shape[:2]
    flat, head, transform = h.reshape(b * n, -1), teacher.get_output_embeddings(), logit_transform(teacher.config)
    parts = []
    for start in range(0, flat.shape[0], chunk_tokens):
        z = head(flat[start:start + chunk_tokens]).float()
        z = transform(z) if transform is not None else z
        if temperature != 1.0:
            z = z / temperature
        top, ids = z.topk(min(k, z.shape[-1]), dim=-1)
        # log Z from the top-K's maximum, in place over the chunk's logits (no longer needed): one pass fewer than
        # logsumexp, which finds the maximum again
        peak = top[:, :1]
        log_z = z.sub_(peak).exp_().sum(-1, keepdim=True).log_().add_(peak)
        logp = top - log_z
        parts.append((ids, logp, _tail(logp, z.shape[-1])))
    ids, logp, tail = (torch.cat(p).cpu() for p in zip(*parts))
    return ids.view(b, n, -1), logp.view(b, n, -1), tail.view(b, n)


def _tail(logp: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(1 - the top-K's probability mass) from the K log-probs alone (a float64 sum): no second pass over the
    vocabulary. Accurate to a few 1e-7 in probability mass (fp32 log-probs); a tail below that is floored at 1e-12,
    a term that weighs nothing in the loss. All of the vocabulary kept: -inf, exactly."""
    if logp.shape[-1] >= vocab:
        return torch.full(logp.shape[:-1], float("-inf"), device=logp.device)
    mass = logp.double().exp().sum(-1)
    return torch.log1p(-mass.clamp(max=1 - 1e-12)).float()


def top_p_counts(logp: torch.Tensor, tail: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(entries kept per token [...], the tail's new log mass [...]) when each token of top-K log-probs `logp`
    [..., K] (most likely first) keeps the fewest entries whose probabilities add up to `p`, at least one: an entry
    is kept while the mass before it is under `p`; the dropped entries' mass joins `tail`."""
    probs = logp.float().exp()
    before = probs.cumsum(-1) - probs
    counts = (before < p).sum(-1).clamp(min=1)
    dropped = torch.arange(logp.shape[-1]) >= counts[..., None]
    new_tail = torch.cat([logp.float().masked_fill(~dropped, float("-inf")), tail.float()[..., None]], -1)
    return counts, new_tail.logsumexp(-1)


def write_teacher_cache(teacher, tokenizer, data, out: str, config: TeacherCacheConfig | None = None, *,
                        text_column: str = "text", identity: dict | None = None, progress: bool = True) -> dict:
    """Run `teacher` (a loaded model) once over `data`'s windows and write the cache to `out`; its metadata.

    `identity` is the teacher's record (`teacher_identity` of its spec, what a later distill compares); by default
    a hash of the loaded parameters. Finished shards of an interrupted run with the same inputs are kept; a cache in
    `out` computed from another teacher, tokenizer, data or settings is refused. Under `accelerate launch` each
    process runs the teacher on every world-th shard (the same shards as one process would write); training from
    the cache then splits its windows across processes as the Trainer splits any dataset.
    """
    import pyarrow as pa
    from accelerate import PartialState
    from tqdm.auto import tqdm

    config = config or TeacherCacheConfig()
    windows = cache_windows(data, tokenizer, config.seq_len, config.max_tokens, text_column, config.seed)
    vocab = teacher.get_output_embeddings().out_features
    k = min(config.top_k, vocab)
    pa_id, np_id = _id_type(vocab)
    lp_np = np.dtype(config.logprob_dtype)
    meta = {"format": FORMAT, "teacher": identity or teacher_identity(teacher), "tokenizer": tokenizer_hash(tokenizer),
            "data": data_identity(data, text_column), "top_k": k, "top_p": config.top_p,
            "temperature": config.temperature,
            "seq_len": config.seq_len, "vocab_size": vocab, "max_tokens": config.max_tokens, "seed": config.seed,
            "id_dtype": np.dtype(np_id).name, "logprob_dtype": config.logprob_dtype, "windows": len(windows),
            "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "shard_windows": config.shard_windows, "complete": False}
    folder = Path(out)
    path = folder / META_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("teacher", "tokenizer", "data", "top_k", "top_p", "temperature", "seq_len", "logprob_dtype",
                    "windows_sha256", "shard_windows"):
            same = same_teacher(old[key], meta[key]) if key == "teacher" else old.get(key) == meta[key]
            if not same:
                raise ValueError(f"teacher cache {out!r} holds another {key}; give a new --out or delete it")
        if old.get("complete"):
            return old
    # under `accelerate launch` every process writes every world-th shard; one process alone writes them all
    state = PartialState(cpu=teacher.device.type == "cpu")  # cpu=True: the ranks of a CPU launch use gloo
    rank, world = state.process_index, state.num_processes
    state.wait_for_everyone()  # every rank has read the old metadata before the main one rewrites it
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp"):
            stale.unlink()
        _write_json(path, {**meta, "processes": world})
    state.wait_for_everyone()
    columns = [("input_ids", pa.list_(pa_id)), ("topk_ids", pa.list_(pa_id)),
               ("topk_logprobs", pa.list_(pa.from_numpy_dtype(lp_np))),
               ("tail_logprob", pa.list_(pa.from_numpy_dtype(lp_np)))]
    if config.top_p is not None:  # a variable number of entries per token: ids and log-probs of the kept ones
        columns.append(("topk_counts", pa.list_(pa_id)))  # counts <= K <= vocab: the ids' type holds them
    schema = pa.schema(columns)
    shards = math.ceil(len(windows) / config.shard_windows)
    batches = [(s, i) for s in range(rank, shards, world) if not (folder / SHARD.format(s)).is_file()
               for i in range(s * config.shard_windows, min((s + 1) * config.shard_windows, len(windows)),
                              config.batch_size)]
    bar = tqdm(total=len(batches), desc="teacher logits", unit="batch", disable=not progress or rank > 0)
    for s in sorted({s for s, _ in batches}):  # this rank's missing shards
        end = min((s + 1) * config.shard_windows, len(windows))
        final, tmp = folder / SHARD.format(s), folder / (SHARD.format(s) + ".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start in range(s * config.shard_windows, end, config.batch_size):
                x = windows[start:min(start + config.batch_size, end)]
                ids, logp, tail = teacher_top_k(teacher, x, k, config.temperature, config.chunk_tokens)
                if config.top_p is None:
                    cols = [_rows(c) for c in (x.numpy().astype(np_id), ids.numpy().astype(np_id),
                                               logp.numpy().astype(lp_np), tail.numpy().astype(lp_np))]
                else:
                    counts, tail = top_p_counts(logp, tail, config.top_p)
                    kept = torch.arange(ids.shape[-1]) < counts[..., None]
                    cols = [_rows(x.numpy().astype(np_id)), _ragged(ids, kept, np_id), _ragged(logp, kept, lp_np),
                            _rows(tail.numpy().astype(lp_np)), _rows(counts.numpy().astype(np_id))]
                writer.write_batch(pa.record_batch(cols, schema=schema))
                bar.update(1)
        os.replace(tmp, final)
    bar.close()
    state.wait_for_everyone()  # every shard is written
    if state.is_main_process:
        tokens = len(windows) * (config.seq_len - 1)
        size = sum(p.stat().st_size for p in folder.glob("shard-*.arrow"))
        meta.update(complete=True, shards=shards, tokens=tokens, bytes=size, bytes_per_token=round(size / tokens, 2),
                    processes=world)
        _write_json(path, meta)
    state.wait_for_everyone()
    return json.loads(path.read_text())


def _rows(array: np.ndarray):
    """[B, ...] -> an Arrow list array of B flat rows."""
    import pyarrow as pa

    flat = array.reshape(len(array), -1)
    offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))


def _ragged(values: torch.Tensor, kept: torch.Tensor, dtype):
    """[B, n, K] values and [B, n, K] kept mask -> an Arrow list array of B rows, each its kept values in order."""
    import pyarrow as pa

    per_row = kept.flatten(1).sum(-1).numpy()
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[kept].numpy().astype(dtype)))


def bytes_per_token(top_k: int, vocab: int, logprob_dtype: str = "float16") -> int:
    """Bytes a cache holds per scored token at most (all K entries): K + 1 ids (the input's and the top-K's) in the
    fewest bits the vocabulary needs, K log-probs and the tail's (what the plan states before writing)."""
    return (top_k + 1) * np.dtype(_id_type(vocab)[1]).itemsize + (top_k + 1) * np.dtype(logprob_dtype).itemsize


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
