"""Depth importance: the perplexity increase when a run of layers is skipped, and Block Importance (BI).

Both read the input of every decoder layer, captured once in the calibration pass (`importance._hooks`):
BI compares the input of layer i with the input of layer i + run; the perplexity pass feeds the input of layer i
straight to layer i + run, so skipping a run re-runs only the layers after it (with the final norm and the head).
The full-model NLL comes from the calibration pass's own logits. `skip_layers` (a whole forward with the run
made identities) is the reference the cached pass must equal.

Metrics (`prune.depth_metric`): ppl = the layers whose single removal raises perplexity least; ppl-run = the
contiguous run of the dropped length with the smallest increase; bi / bi-run = the same by Block Importance.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .archs import get_arch

DEPTH_METRICS = ("ppl", "ppl-run", "bi", "bi-run")


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def skip_layers(model, indices):
    """Temporarily make decoder layers identity functions (the reference perplexity-drop computation)."""
    layers = get_arch(model.config).decoder_layers(model)
    for i in indices:
        layers[i].forward = _identity
    try:
        yield
    finally:
        for i in indices:
            del layers[i].forward


@contextmanager
def _resume_at(layers, stop: int, hidden: torch.Tensor):
    """Layers 0..stop-1 become identities and the last of them hands on `hidden`: the model's forward then runs
    only layers stop.. on it, with everything else (rotary, masks, final norm, head, logit soft-cap) its own."""
    for j in range(stop):
        layers[j].forward = _identity
    layers[stop - 1].forward = lambda *args, **kwargs: hidden
    try:
        yield
    finally:
        for j in range(stop):
            del layers[j].forward


def nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of `batch` [B, S] under `logits` [B, S, V], float64, on the logits' device
    (a dispatched model's logits come from its last device, its input went to its first)."""
    logits = logits[:, :-1].float()
    targets = batch[:, 1:].reshape(-1).to(logits.device)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                             reduction="sum").double()


@torch.no_grad()
def perplexity_drop(model, batch: torch.Tensor, inputs: list[torch.Tensor], runs: list[int]) -> torch.Tensor:
    """[len(runs), layers]: summed NLL of `batch` with layers i..i+run-1 skipped, for every run length and start i
    (entries past layers - run stay 0).

    `inputs[i]` is the input of layer i in the full forward of `batch` (or of a batch it is the first rows of).
    Skipping i..i+run-1 costs layers - i - run layers plus the head instead of a whole forward: about half.
    """
    layers = get_arch(model.config).decoder_layers(model)
    n = len(layers)
    out = torch.zeros(len(runs), n, dtype=torch.float64, device=batch.device)
    for r, run in enumerate(runs):
        for i in range(n - run + 1):
            with _resume_at(layers, i + run, inputs[i][: len(batch)]):
                out[r, i] = nll_sum(model(input_ids=batch, use_cache=False).logits, batch).to(out.device)
    return out


def add_block_importance(bi_sum: torch.Tensor, states: list[torch.Tensor], max_run: int) -> None:
    """bi_sum[run-1, i] += sum over tokens of 1 - cos(h_i, h_{i+run}), for every run length at once.

    Each token's state is normalised once; the summed cosines of every pair of depths are then one matrix product
    (a per-pair cosine_similarity loop costs hundreds of small kernels per batch).
    """
    n_layers = len(states) - 1
    tokens = states[0].numel() // states[0].shape[-1]
    unit = torch.stack([torch.nn.functional.normalize(h.float(), dim=-1, eps=1e-8).flatten().to(bi_sum.device)
                        for h in states])  # a dispatched model's states come from the devices of their layers
    cos_sum = (unit @ unit.T).double()  # [i, j] = sum over tokens of cos(h_i, h_j)
    for run in range(1, max_run + 1):
        i = torch.arange(n_layers - run + 1, device=cos_sum.device)
        bi_sum[run - 1, : n_layers - run + 1] += tokens - cos_sum[i, i + run]
