"""Minitron distillation losses, computed in token chunks so the full logits of both models never coexist.

The student's LM head runs per chunk under `torch.utils.checkpoint` (recomputed in backward), and the teacher's
logits are recomputed per chunk from its final hidden states, so the loss's peak memory grows with the chunk, not
with batch x seq x vocab. Every function returns *sums* over tokens; the trainer divides by the token count of the
whole gradient-accumulation window.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LogitLoss = Literal["forward_kl", "reverse_kl", "jsd", "mse", "cosine"]
StateLoss = Literal["mse", "cosine"]
LOGIT_LOSSES, STATE_LOSSES = typing.get_args(LogitLoss), typing.get_args(StateLoss)
Transform = Callable[[torch.Tensor], torch.Tensor] | None  # applied to an LM head's output (archs.logit_transform)


def check_loss_name(name: str, allowed: tuple[str, ...], what: str) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(allowed)}")


def logit_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
                     temperature: float = 1.0, top_k: int | None = None, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence [N] between [N, V] logits (already cut to the shared vocabulary).

    KL/JSD are scaled by tau^2 (Hinton) so gradients keep their size across temperatures. With `top_k`, both
    models are compared on the teacher's K most likely tokens only (both renormalised over them), so the loss is
    still zero when the student matches the teacher.
    """
    zs = student_logits.float() / temperature
    zt = teacher_logits.float() / temperature
    if kind in ("mse", "cosine"):
        if top_k:
            zt, idx = zt.topk(top_k, dim=-1)
            zs = zs.gather(-1, idx)
        if kind == "mse":
            return (zs - zt).pow(2).mean(-1)
        return 1.0 - F.cosine_similarity(zs, zt, dim=-1)
    if top_k:
        zt, idx = zt.topk(top_k, dim=-1)
        zs = zs.gather(-1, idx)
    log_ps, log_pt = zs.log_softmax(-1), zt.log_softmax(-1)
    scale = temperature ** 2
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return scale * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return scale * (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    # generalized JSD as in GKD (Agarwal et al.): m = beta*p_t + (1-beta)*p_s
    log_m = torch.logsumexp(torch.stack([log_pt + math.log(beta), log_ps + math.log(1 - beta)]), dim=0)
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return scale * (beta * kl_t + (1 - beta) * kl_s)


def apply_head(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The LM head's weights applied to `h` without calling the module: under FSDP2 the head belongs to a unit
    (accelerate's tail unit) whose hooks must run once per model forward; its weights stay gathered from the
    forward through the backward, so using them directly, once per chunk and again in checkpoint recomputation, is
    safe where calling the module again would re-enter FSDP's forward/backward state machine. `h` moves to the
    head's device (a teacher dispatched over GPUs may keep its head elsewhere than its final norm)."""
    return F.linear(h.to(head.weight.device), head.weight, head.bias)


def _chunk_losses(h_s: torch.Tensor, h_t: torch.Tensor, labels: torch.Tensor, student_head: nn.Module,
                  teacher_head: nn.Module, vocab: int, kind: str, temperature: float, top_k: int | None, beta: float,
                  with_ce: bool, student_transform: Transform, teacher_transform: Transform
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence sum, cross-entropy sum) of one chunk of tokens."""
    z_s = apply_head(student_head, h_s)
    if student_transform is not None:
        z_s = student_transform(z_s.float())
    with torch.no_grad():
        z_t = apply_head(teacher_head, h_t).to(device=z_s.device, dtype=torch.float32)
        if teacher_transform is not None:
            z_t = teacher_transform(z_t)
    kd = logit_divergence(z_s[:, :vocab], z_t[:, :vocab], kind, temperature, top_k, beta).sum()
    ce = F.cross_entropy(z_s.float(), labels, reduction="sum") if with_ce else kd.new_zeros(())
    return kd, ce


def chunked_logit_losses(h_s: torch.Tensor, h_t: torch.Tensor, labels: torch.Tensor, student_head: nn.Module,
                         teacher_head: nn.Module, kind: str = "forward_kl", temperature: float = 1.0,
                         top_k: int | None = None, beta: float = 0.5, chunk_tokens: int | None = 1024,
                         with_ce: bool = True, student_transform: Transform = None,
                         teacher_transform: Transform = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the logit divergence and of the cross-entropy over N tokens.

    `h_s` [N, H_s] and `h_t` [N, H_t] are the final (normed) hidden states at the positions to score, `labels` [N]
    the next tokens. `*_transform` is what each model's forward applies after its LM head (`archs.logit_transform`:
    Gemma's soft cap), so the loss compares the distributions the models output. Only the first min(V_s, V_t)
    logits are compared (padded vocabularies). `chunk_tokens` of None/0, or N within one chunk, computes everything
    at once without checkpointing; more chunks are each checkpointed (their heads recomputed in the backward) so
    only one chunk's [chunk, V] tensors live at a time.
    """
    check_loss_name(kind, LOGIT_LOSSES, "logit loss")
    vocab = min(student_head.out_features, teacher_head.out_features)
    fn = partial(_chunk_losses, student_head=student_head, teacher_head=teacher_head, vocab=vocab, kind=kind,
                 temperature=temperature, top_k=top_k, beta=beta, with_ce=with_ce,
                 student_transform=student_transform, teacher_transform=teacher_transform)
    if not chunk_tokens or h_s.shape[0] <= chunk_tokens:  # one chunk: checkpointing it would recompute the heads
        return fn(h_s, h_t, labels)  # (+30-55% of the loss's time: bench/logit_loss.py) for the same peak memory
    kd_total = h_s.new_zeros((), dtype=torch.float32)
    ce_total = h_s.new_zeros((), dtype=torch.float32)
    for start in range(0, h_s.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        kd, ce = checkpoint(fn, h_s[sl], h_t[sl], labels[sl], use_reentrant=False)
        kd_total = kd_total + kd
        ce_total = ce_total + ce
    return kd_total, ce_total


SMALL_TAIL = 1e-4  # below this student tail mass, 1 - (top-K mass) loses float32 precision


def sparse_forward_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                      tail_logp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token forward KL [N] from a cached teacher: its K most likely tokens `top_ids` [N, K] with log-probs
    `top_logp` [N, K] (-inf: padding, no mass), plus one tail bucket holding the rest of its mass (`tail_logp` [N],
    -inf when K = vocab).

    The student's distribution (at the same temperature, cut to the teacher's vocabulary by the caller) is folded
    onto the same K + 1 buckets, so the loss is exact when K = vocab and a lower bound of the full KL otherwise
    (merging outcomes never raises a KL); scaled by tau^2 like `logit_divergence`.
    """
    zs = student_logits.float()
    if temperature != 1.0:
        zs = zs / temperature
    log_z = zs.logsumexp(-1)
    ls_top = zs.gather(-1, top_ids) - log_z[:, None]
    # the student's remaining mass from its top-K alone (a second pass over the vocabulary cost a third of the loss);
    # where that mass is too small for float32 to resolve, from a log-sum-exp over the rest of those rows' vocabulary
    kept = top_logp > float("-inf")  # a top-P cache pads with an id already listed, at log-prob -inf
    q_tail = (1 - torch.where(kept, ls_top.double().exp(), 0.0).sum(-1)).clamp_min(1e-12)
    ls_tail = q_tail.log().float()
    exact = (q_tail < SMALL_TAIL).nonzero().squeeze(-1)
    if len(exact):  # a large finite fill instead of -inf keeps the gradient finite when K = vocab
        rest = zs[exact].scatter(-1, top_ids[exact], torch.finfo(zs.dtype).min).logsumexp(-1) - log_z[exact]
        ls_tail = ls_tail.index_put((exact,), rest)
    lt_top, lt_tail = top_logp.float(), tail_logp.float()
    pt_top, pt_tail = lt_top.exp(), lt_tail.exp()
    top = pt_top * (torch.where(pt_top > 0, lt_top, 0.0) - ls_top)  # 0 * log 0 = 0: a top-P cache's padding
    tail = pt_tail * (torch.where(pt_tail > 0, lt_tail, 0.0) - ls_tail)
    return temperature ** 2 * (top.sum(-1) + tail)


def _sparse_chunk(h_s: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor,
                  labels: torch.Tensor, student_head: nn.Module, vocab: int, temperature: float, with_ce: bool,
                  student_transform: Transform) -> tuple[torch.Tensor, torch.Tensor]:
    z_s = apply_head(student_head, h_s)
    if student_transform is not None:
        z_s = student_transform(z_s.float())
    kd = sparse_forward_kl(z_s[:, :vocab], top_ids, top_logp, tail_logp, temperature).sum()
    ce = F.cross_entropy(z_s.float(), labels, reduction="sum") if with_ce else kd.new_zeros(())
    return kd, ce


def chunked_sparse_losses(h_s: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor,
                          labels: torch.Tensor, student_head: nn.Module, vocab: int, temperature: float = 1.0,
                          chunk_tokens: int | None = 1024, with_ce: bool = True,
                          student_transform: Transform = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_logit_losses` against a cached teacher (`sparse_forward_kl`): sums of the forward KL and of the
    cross-entropy over N tokens, the student's head run per chunk under checkpointing. `vocab` is the teacher's."""
    fn = partial(_sparse_chunk, student_head=student_head, vocab=vocab, temperature=temperature, with_ce=with_ce,
                 student_transform=student_transform)
    if not chunk_tokens or h_s.shape[0] <= chunk_tokens:  # one chunk: no checkpoint (same peak, no recompute)
        return fn(h_s, top_ids, top_logp, tail_logp, labels)
    kd_total = h_s.new_zeros((), dtype=torch.float32)
    ce_total = h_s.new_zeros((), dtype=torch.float32)
    for start in range(0, h_s.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        kd, ce = checkpoint(fn, h_s[sl], top_ids[sl], top_logp[sl], tail_logp[sl], labels[sl], use_reentrant=False)
        kd_total = kd_total + kd
        ce_total = ce_total + ce
    return kd_total, ce_total


def state_loss(h_s: torch.Tensor, h_t: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-token loss [N] between a projected student state and a teacher state, both [N, H_t].

    cosine: 1 - cos over channels (NVIDIA's choice: raw residual streams carry a few huge outlier channels that
    dominate an MSE); mse: mean squared error over channels.
    """
    check_loss_name(kind, STATE_LOSSES, "intermediate-state loss")
    h_s, h_t = h_s.float(), h_t.float()
    if kind == "mse":
        return (h_s - h_t).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(h_s, h_t, dim=-1)


def intermediate_losses(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                        projections: Sequence[nn.Module], kind: str = "cosine") -> torch.Tensor:
    """Sum over tokens of the per-token state loss, averaged over the state pairs; `projections[i]` maps the
    student's state i to the teacher's width (the same module for every pair when the projection is shared)."""
    total = student_states[0].new_zeros((), dtype=torch.float32)
    for h_s, h_t, proj in zip(student_states, teacher_states, projections, strict=True):
        h_s = proj(h_s.to(proj.weight.dtype))
        total = total + state_loss(h_s, h_t.to(h_s.device), kind).sum()
    return total / max(len(projections), 1)
