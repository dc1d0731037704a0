"""Attention-head importance: three ways to score a head, all from forward passes.

- `input`: the norm of each head's output before the output projection (the paper's F_head, section 2.2).
- `output`: the norm of each head's contribution after the output projection, ||W_o[:, h] a_h||: what the
  residual stream actually receives. A head with a large output but a small projection scores low here.
- `ablation`: the perplexity increase when the head is zeroed, one pass per head on a few calibration sequences.
  The most direct measure of what pruning the head does; it costs layers x heads extra forward passes per sequence.

`input` and `output` are accumulated by the importance hooks in the calibration pass (all nine aggregations);
`ablation` is a separate pass (`head_ablation`). `prune.head_score` chooses which one ranks the heads.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from tqdm.auto import tqdm

from .archs import get_arch, head_dim
from .depth import _resume_at, nll_sum

HeadScore = Literal["input", "output", "ablation"]


def output_norms(x: torch.Tensor, o_proj: torch.nn.Linear, d: int) -> torch.Tensor:
    """[B, S, heads]: ||W_o[:, h] x_h|| for the input x [B, S, heads * d] of the output projection.

    Computed as sqrt(x_h^T G_h x_h) with G_h = W_h^T W_h, so no [B, S, heads, hidden] tensor is built.
    """
    w = o_proj.weight.float()
    heads = w.shape[1] // d
    w = w.view(w.shape[0], heads, d)
    gram = torch.einsum("ohd,ohe->hde", w, w)  # [heads, d, d]
    xh = x.float().view(*x.shape[:-1], heads, d)
    return torch.einsum("bshd,hde,bshe->bsh", xh, gram, xh).clamp_min(0).sqrt()


@contextmanager
def zero_head(model, layer: int, head: int):
    """Zero one query head's output (the input rows of its output projection) while the context is open."""
    spec = get_arch(model.config)
    d = head_dim(model.config)
    o_proj = spec.out_proj(spec.decoder_layers(model)[layer])

    def hook(_module, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0
        return (x, *args[1:])

    handle = o_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _layer_inputs(model, batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The input of every decoder layer in one forward of `batch`, and that forward's summed NLL."""
    layers = get_arch(model.config).decoder_layers(model)
    inputs: list[torch.Tensor] = []

    def capture(_module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    try:
        logits = model(input_ids=batch, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return inputs, nll_sum(logits, batch).to(batch.device)


@torch.no_grad()
def head_ablation(model, batches: list[torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """Summed NLL with each head zeroed ([layers, heads]), the unablated NLL and the token count.

    Zeroing a head of layer i changes nothing before it: the forward resumes from layer i's cached input, so the
    pass costs about half of layers x heads whole forwards.
    """
    cfg = model.config
    layers = get_arch(cfg).decoder_layers(model)
    device = next(model.parameters()).device
    nll = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64, device=device)
    base = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    steps = len(batches) * cfg.num_hidden_layers
    with tqdm(total=steps, desc="head ablation", disable=not progress) as bar:
        for batch in batches:
            batch = batch.to(device)
            inputs, full = _layer_inputs(model, batch)
            base += full
            tokens += batch[:, 1:].numel()
            for i in range(cfg.num_hidden_layers):
                for h in range(cfg.num_attention_heads):
                    with _resume_at(layers, i, inputs[i]) if i else nullcontext(), zero_head(model, i, h):
                        nll[i, h] += nll_sum(model(input_ids=batch, use_cache=False).logits, batch).to(device)
                bar.update()
    return {"head_ablation_nll": nll, "head_ablation_base_nll": base, "head_ablation_tokens": tokens}


def ablation_scores(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """[layers, heads]: perplexity with the head zeroed minus the full model's (higher = more important)."""
    count = float(tensors["head_ablation_tokens"])
    return torch.exp(tensors["head_ablation_nll"] / count) - math.exp(float(tensors["head_ablation_base_nll"]) / count)
