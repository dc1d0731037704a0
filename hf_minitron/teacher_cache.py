"""Teacher-logit cache: run the teacher once over the distillation windows, distil any number of students from disk.

A cache folder holds `teacher_cache.json` (what it was computed from: teacher, tokenizer, data, K, temperature,
window length; counts and bytes per token) and Arrow shards (`shard-NNNNN.arrow`, `datasets.Dataset.from_file` or
`load_dataset("arrow", ...)`), one row per window: `input_ids` [L], and for each of the L - 1 scored positions the
teacher's top-K ids (uint16 when the vocabulary fits), their log-probs and the log of the remaining tail mass
(float16 by default). `distill` with `teacher_cache` trains on exactly these windows with the sparse forward KL of
`losses.chunked_sparse_losses`, never loading the teacher. Shards are written to a temporary name and renamed, so a
killed writer resumes at the first missing shard.
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
from .distill import MinitronDistillTrainer
from .losses import check_loss_name, chunked_sparse_losses
from .schedule import resolve_schedule

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


def _same_teacher(a: dict, b: dict) -> bool:
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
    from .data import DataSourceError, TextSource, _cut, token_ids, window_bos

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
    if sample and len(windows) > n:
        windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n].sort().values]
    return windows


def _id_type(vocab: int):
    import pyarrow as pa

    return (pa.uint16(), np.uint16) if vocab <= 1 << 16 else (pa.uint32(), np.uint32)


@torch.no_grad()
def teacher_top_k(teacher, input_ids: torch.Tensor, k: int, temperature: float = 1.0, chunk_tokens: int = 1024):
    """(ids [B, L-1, K], log-probs [B, L-1, K], log tail mass [B, L-1]) of the teacher's next-token distributions at
    the scored positions of `input_ids` [B, L], at `temperature`; the LM head runs per chunk of tokens."""
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
        z = (transform(z) if transform is not None else z) / temperature
        log_z = z.logsumexp(-1, keepdim=True)
        top, ids = z.topk(min(k, z.shape[-1]), dim=-1)
        tail = z.scatter(-1, ids, float("-inf")).logsumexp(-1) - log_z[:, 0]
        parts.append((ids, top - log_z, tail))
    ids, logp, tail = (torch.cat(p).cpu() for p in zip(*parts))
    return ids.view(b, n, -1), logp.view(b, n, -1), tail.view(b, n)


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
            "data": data_identity(data, text_column), "top_k": k, "top_p": None, "temperature": config.temperature,
            "seq_len": config.seq_len, "vocab_size": vocab, "max_tokens": config.max_tokens, "seed": config.seed,
            "id_dtype": np.dtype(np_id).name, "logprob_dtype": config.logprob_dtype, "windows": len(windows),
            "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "shard_windows": config.shard_windows, "complete": False}
    folder = Path(out)
    path = folder / META_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("teacher", "tokenizer", "data", "top_k", "temperature", "seq_len", "logprob_dtype",
                    "windows_sha256", "shard_windows"):
            same = _same_teacher(old[key], meta[key]) if key == "teacher" else old.get(key) == meta[key]
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
    schema = pa.schema([("input_ids", pa.list_(pa_id)), ("topk_ids", pa.list_(pa_id)),
                        ("topk_logprobs", pa.list_(pa.from_numpy_dtype(lp_np))),
                        ("tail_logprob", pa.list_(pa.from_numpy_dtype(lp_np)))])
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
                cols = [x.numpy().astype(np_id), ids.numpy().astype(np_id), logp.numpy().astype(lp_np),
                        tail.numpy().astype(lp_np)]
                writer.write_batch(pa.record_batch([_rows(c) for c in cols], schema=schema))
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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ---- reading ------------------------------------------------------------------------------------------------
class TeacherCache:
    """A finished cache folder: its metadata, its windows as a `datasets.Dataset`, the checks of a distill run."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        path = self.folder / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder!r} is not a teacher cache (no {META_FILE}; write one with "
                                    f"hf-minitron teacher-logits)")
        self.meta = json.loads(path.read_text())
        if not self.meta.get("complete"):
            raise ValueError(f"teacher cache {folder!r} is incomplete: rerun hf-minitron teacher-logits to finish it")

    def dataset(self):
        """Every window, memory-mapped (no copy), rows as numpy arrays."""
        from datasets import Dataset, concatenate_datasets

        parts = [Dataset.from_file(str(self.folder / SHARD.format(s))) for s in range(self.meta["shards"])]
        return concatenate_datasets(parts).with_format("numpy")

    def check(self, tokenizer, teacher=None, data=None, text_column: str = "text") -> None:
        """One-line ValueError naming the first of tokenizer, teacher (when given), data (when given) that is not
        what the cache was computed from."""
        m, name = self.meta, str(self.folder)
        if tokenizer_hash(tokenizer) != m["tokenizer"]:
            raise ValueError(f"teacher cache {name!r} was written with another tokenizer")
        if teacher is not None and not _same_teacher(m["teacher"], teacher_identity(teacher)):
            raise ValueError(f"teacher cache {name!r} holds the logits of {m['teacher'].get('source')!r}, not of "
                             f"the teacher given")
        if data is not None and data_identity(data, text_column)["hash"] != m["data"]["hash"]:
            what = m["data"].get("path") or "a dataset"
            raise ValueError(f"teacher cache {name!r} was written from other data ({what})")

    def check_config(self, config, student_vocab: int) -> None:
        """The distill settings a cache can serve: forward KL at its temperature, no intermediate states."""
        from .intermediate import AUTO

        m, name = self.meta, str(self.folder)
        if config.logit_loss != "forward_kl" or config.top_k:
            raise ValueError(f"a teacher cache serves logit_loss forward_kl without top_k (it keeps its own K = "
                             f"{m['top_k']}), not {config.logit_loss!r} with top_k {config.top_k}")
        if not math.isclose(config.temperature, m["temperature"]):
            raise ValueError(f"teacher cache {name!r} holds log-probs at temperature {m['temperature']}, the run "
                             f"asks for {config.temperature}")
        if config.is_layers not in (None, "", "off", "none", AUTO) or "attention" in config.is_sites:
            raise ValueError("intermediate-state losses (is_layers, is_sites attention) need the live teacher: "
                             "drop them or the teacher cache")
        if student_vocab < m["vocab_size"]:
            raise ValueError(f"the student has {student_vocab} logits, fewer than the cached teacher's "
                             f"{m['vocab_size']}")


def cached_dataset(cache: TeacherCache, config, student, tokenizer, teacher=None, data=None, text_column="text"):
    """The cache's windows to distil `student` on, once the run's settings, tokenizer, teacher (a spec or model,
    when given: never loaded) and data (when given) are found to be the cache's; the windows set max_length."""
    cache.check_config(config, student.get_output_embeddings().out_features)
    cache.check(tokenizer, teacher, data, text_column)
    seq_len = cache.meta["seq_len"]
    if config.max_length != seq_len:
        print(f"teacher cache: training on its windows of {seq_len} tokens (max_length {config.max_length} "
              f"set to {seq_len})", flush=True)
        config.max_length = seq_len
    return cache.dataset()


def collate_cached(rows: list[dict]) -> dict:
    """Cache rows -> a training batch: input_ids/labels [B, L], topk_ids [B, L-1, K], log-probs, tail [B, L-1]."""
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
    b, n = ids.shape[0], ids.shape[1] - 1
    top = torch.from_numpy(np.stack([r["topk_ids"] for r in rows]).astype(np.int64)).view(b, n, -1)
    logp = torch.from_numpy(np.stack([r["topk_logprobs"] for r in rows]).astype(np.float32)).view(b, n, -1)
    tail = torch.from_numpy(np.stack([r["tail_logprob"] for r in rows]).astype(np.float32)).view(b, n)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "topk_ids": top,
            "topk_logprobs": logp, "tail_logprob": tail}


# ---- training from a cache -------------------------------------------------------------------------------------
class _NoStates:
    def remove(self) -> None:
        pass


class CachedDistillTrainer(MinitronDistillTrainer):
    """`MinitronDistillTrainer` whose teacher is a `TeacherCache`: the logit loss (and L_CLM) from the cached top-K,
    on the cache's windows as they are (no packing: each row already is one window), no teacher in memory."""

    def __init__(self, model, cache: TeacherCache, args, **kwargs):
        from trl import SFTTrainer

        resolve_schedule(args)
        self.cache, self.teacher, self.state_pairs, self.is_note = cache, None, [], None
        self.att_index, self.proj_index, self.s_reader = [], [], _NoStates()
        self.t_reader, self.save_dtype = self.s_reader, None
        self.logit_transforms = (logit_transform(model.config), None)
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        SFTTrainer.__init__(self, model=model, args=args, data_collator=collate_cached, **kwargs)
        self.model_accepts_loss_kwargs = True

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["input_ids", "topk_ids", "topk_logprobs", "tail_logprob"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg, labels = self.args, inputs["labels"]
        mask = labels[:, 1:] != -100
        none = torch.empty(0, dtype=torch.long, device=labels.device)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=none)
        s_final = out.hidden_states[-1]
        del out
        kd_sum, ce_sum = chunked_sparse_losses(
            s_final[:, :-1][mask], inputs["topk_ids"][mask], inputs["topk_logprobs"][mask],
            inputs["tail_logprob"][mask], labels[:, 1:][mask],
            self.accelerator.unwrap_model(model).get_output_embeddings(), self.cache.meta["vocab_size"],
            cfg.temperature, cfg.kd_chunk_tokens, cfg.w_clm != 0, self.logit_transforms[0])
        n_local = mask.sum()
        n = num_items_in_batch if num_items_in_batch is not None else n_local.clamp(min=1)
        loss = cfg.w_logit * kd_sum / n + cfg.w_clm * ce_sum / n
        if num_items_in_batch is None and model.training:  # as MinitronDistillTrainer.compute_loss
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        elif cfg.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        self._log_parts(kd_sum, ce_sum, None, n, n_local, inputs)
        return (loss, None) if return_outputs else loss
