"""Evaluation of family members. For now: perplexity on strided windows of any text source.

Run alone (from Python): `perplexity(model, text_windows("wikitext2_test.txt", tokenizer, 512, 16))`.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows [n, seq_len], every window scored independently.

    Hand-written rather than `evaluate.load("perplexity")`: that metric reloads a model by name, while we score
    the in-memory pruned model.
    """
    device = next(model.parameters()).device
    model.eval()
    nll, tokens = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        batch = windows[i: i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        tokens += batch[:, 1:].numel()
    return math.exp(nll / tokens)
