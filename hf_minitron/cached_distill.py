"""Distilling from a teacher-logit cache (`teacher_cache.py` writes one): the cache read back and checked against
the run, its rows batched, and the trainer whose logit loss is the sparse forward KL over the cached top-K plus a tail
bucket (`losses.chunked_sparse_losses`), so the teacher is never loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .archs import logit_transform
from .distill import MinitronDistillTrainer
from .losses import chunked_sparse_losses
from .schedule import resolve_schedule
from .teacher_cache import META_FILE, SHARD, same_teacher, data_identity, teacher_identity, tokenizer_hash


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
        if teacher is not None and not same_teacher(m["teacher"], teacher_identity(teacher)):
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
    """Cache rows -> a training batch: input_ids/labels [B, L], topk_ids [B, L-1, K], log-probs, tail [B, L-1]. A
    top-P cache's tokens keep different numbers of entries: they are padded to the batch's most with log-prob -inf
    (no mass) on a repeat of the token's first id (so the student's tail is not cut by a token the teacher kept)."""
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
    b, n = ids.shape[0], ids.shape[1] - 1
    if "topk_counts" in rows[0]:
        counts = np.stack([r["topk_counts"] for r in rows]).astype(np.int64)  # [B, n]
        width = int(counts.max())
        kept = np.arange(width) < counts[..., None]
        flat_ids = np.concatenate([r["topk_ids"] for r in rows]).astype(np.int64)
        first = flat_ids[np.cumsum(counts.reshape(-1)) - counts.reshape(-1)]  # each token's most likely id
        top = np.repeat(first.reshape(b, n, 1), width, -1)
        top[kept] = flat_ids
        logp = np.full((b, n, width), -np.inf, dtype=np.float32)
        logp[kept] = np.concatenate([r["topk_logprobs"] for r in rows]).astype(np.float32)
        top, logp = torch.from_numpy(top), torch.from_numpy(logp)
    else:
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
        self._signature_columns = ["input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "topk_counts"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg, labels = self.args, inputs["labels"]
        mask = labels[:, 1:] != -100
        none = torch.empty(0, dtype=torch.long, device=labels.device)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=none)
        s_final = out.hidden_states[-1]
        del out
        with self.accelerator.autocast():  # the LM head in the forward's precision (accelerate wraps the forward)
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
