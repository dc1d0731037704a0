"""HellaSwag 0-shot scoring and the benchmark-domain text bench/distill_recovery.py may distil on: the unscored
tasks' contexts, alone or continued by the teacher. Shared with bench/paper (its HellaSwag column)."""

from __future__ import annotations

import json
import math
import os
import time

import torch


# ---- HellaSwag 0-shot scorer ---------------------------------------------------------------------------------------
def load_hellaswag(path: str, n: int) -> list[dict]:
    tasks = []
    with open(path) as f:
        for line in f:
            if line.strip():
                tasks.append(json.loads(line))
            if len(tasks) >= n:
                break
    return tasks


def encode_hellaswag(tasks: list[dict], tokenizer) -> list[tuple[list[int], int]]:
    """(token ids of ctx + " " + ending, number of continuation tokens) per task and ending, in order.

    As lm-eval does: the continuation tokens are those of the whole string after the context's own tokens.
    """
    items = []
    for t in tasks:
        ctx = t["ctx"]
        n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
        for ending in t["endings"]:
            whole = tokenizer(ctx + " " + ending, add_special_tokens=False)["input_ids"]
            items.append((whole, len(whole) - n_ctx))
    return items


@torch.no_grad()
def sequence_loglik(model, items: list[tuple[list[int], int]], max_batch_tokens: int = 4096,
                    pad_id: int = 0) -> list[float]:
    """Sum log-likelihood of the last `n_cont` tokens of each sequence.

    Sequences are sorted by length and right-padded into batches of at most `max_batch_tokens` padded tokens; only
    the continuation positions go through the LM head (no [batch, seq, vocab] logits).
    """
    model.eval()
    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings()
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    out = [0.0] * len(items)
    i = 0
    while i < len(order):
        longest = len(items[order[i]][0])
        bs = max(1, max_batch_tokens // longest)
        idx = order[i: i + bs]
        i += bs
        ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows, pos, tgt, owner = [], [], [], []
        for r, j in enumerate(idx):
            seq, n_cont = items[j]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            for p in range(len(seq) - n_cont, len(seq)):  # token p is predicted at position p - 1
                rows.append(r)
                pos.append(p - 1)
                tgt.append(seq[p])
                owner.append(j)
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        h = hidden[torch.tensor(rows, device=device), torch.tensor(pos, device=device)]
        logits = head(h).float()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ll = torch.log_softmax(logits, -1).gather(1, torch.tensor(tgt, device=device)[:, None])[:, 0].tolist()
        for j, v in zip(owner, ll):
            out[j] += v
    return out


def hellaswag(model, tasks: list[dict], items: list[tuple[list[int], int]], pad_id: int) -> dict:
    ll = sequence_loglik(model, items, pad_id=pad_id)
    acc = 0
    norm_hits = []
    for k, t in enumerate(tasks):
        s = ll[4 * k: 4 * k + 4]
        norm = [v / len(e) for v, e in zip(s, t["endings"])]
        acc += int(max(range(4), key=lambda c: s[c]) == int(t["label"]))
        norm_hits.append(int(max(range(4), key=lambda c: norm[c]) == int(t["label"])))
    return {"acc": acc / len(tasks), "acc_norm": sum(norm_hits) / len(tasks), "n": len(tasks),
            "norm_hits": norm_hits}


def paired_se(a: dict, b: dict) -> float:
    """Standard error of acc_norm(a) - acc_norm(b) over the same tasks: paired when both runs kept their per-task
    hits (the common case), else the unpaired sqrt(SE_a^2 + SE_b^2)."""
    ha, hb = a.get("hellaswag_norm_hits"), b.get("hellaswag_norm_hits")
    if ha and hb and len(ha) == len(hb):
        d = [x - y for x, y in zip(ha, hb)]
        mean = sum(d) / len(d)
        return math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    var = sum(r["hellaswag_acc_norm"] * (1 - r["hellaswag_acc_norm"]) / r["hellaswag_n"] for r in (a, b))
    return math.sqrt(var)


def write_hellaswag_contexts(data_dir: str, first: int, out_dir: str) -> str:
    """A text file of the contexts of HellaSwag tasks `first`.. (one a line): never a scored task's, never an ending
    or a label. Consecutive tasks of one video share sentences (a task's context can hold the previous task's right
    ending), so a context sharing any sentence with a scored task's context or endings is left out. Returns its path.
    """
    def sentences(text: str) -> set[str]:
        text = text.split(": ", 1)[-1]  # without the activity label that prefixes every context
        return {x.strip().lower() for x in text.replace("!", ".").replace("?", ".").split(".") if len(x.strip()) > 20}

    path = os.path.join(out_dir, f"hellaswag_contexts_from_{first}.txt")
    with open(os.path.join(data_dir, "hellaswag_val_dev.jsonl")) as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    scored = set().union(*(sentences(t["ctx"] + " " + e) for t in tasks[:first] for e in t["endings"]))
    kept = [t["ctx"] for t in tasks[first:] if not sentences(t["ctx"]) & scored]
    with open(path, "w") as f:
        f.write("\n".join(kept) + "\n")
    print(f"DATA: {len(kept)} HellaSwag contexts of tasks {first}-{len(tasks) - 1} in {path} "
          f"({len(tasks) - first - len(kept)} left out: they share a sentence with a scored task)", flush=True)
    return path


@torch.no_grad()
def continue_with_teacher(teacher, tokenizer, contexts_path: str, new_tokens: int, temperature: float, seed: int,
                          batch_size: int = 64) -> str:
    """Each context of `contexts_path` followed by `new_tokens` tokens the teacher samples after it (one a line):
    text of the benchmark's domain in the teacher's own words, no ending or label read (sequence-level KD's data,
    Kim & Rush 2016). Contexts go through in length order (less padding), the text keeps the file's. Returns the
    path of the new file beside `contexts_path`."""
    from hf_minitron.training import native_cpu_bf16

    with open(contexts_path) as f:
        contexts = [line for line in f.read().splitlines() if line.strip()]
    path = os.path.splitext(contexts_path)[0] + f"_teacher{new_tokens}_t{temperature:g}_seed{seed}.txt"
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    continued = [""] * len(contexts)
    teacher.eval()
    t0 = time.perf_counter()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([contexts[i] for i in idx], return_tensors="pt", padding=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_cpu_bf16()):
                out = teacher.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                       temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad)
            for i, ids in zip(idx, out[:, enc.input_ids.shape[1]:]):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                continued[i] = contexts[i] + " ".join(text.splitlines())
    finally:
        tokenizer.padding_side = side
    with open(path, "w") as f:
        f.write("\n".join(continued) + "\n")
    print(f"DATA: {len(contexts)} contexts continued by the teacher ({new_tokens} tokens each, temperature "
          f"{temperature:g}, seed {seed}) in {time.perf_counter() - t0:.0f} s: {path}", flush=True)
    return path
