"""Intermediate-state distillation L_is (Minitron, arXiv 2407.14679 section 3 and appendix A.4): which states are
compared, how they are read, and the learned projection from the student's width to the teacher's.

A pair `t:s` names hidden-state indices as in HF `hidden_states` (0 = embedding output, i = output of block i; the
last index is after the final norm). Each pair is compared at each chosen site: `block` (that hidden state: L_emb for
0:0, L_o otherwise) and `mlp_input` (L_i: the residual stream entering block i's MLP, read by a forward pre-hook
on the norm `ArchSpec.mlp_input_norm`; pairs with index 0 have no MLP input) and `attention` (L_att: MiniLMv2's
self-attention relations of block i's query, key and value projections, see `attention_relation_loss`; pairs with
index 0 have no attention block). L_att needs no projection: relations are [S, S] whatever the models' widths.
"""

from __future__ import annotations

import math
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .archs import get_arch, head_dim, num_kv_heads

Site = Literal["block", "mlp_input", "attention"]
Projection = Literal["shared", "per_pair"]
SITES = typing.get_args(Site)
AUTO = "auto"  # is_layers: the policy below
OFF = ("", "off", "none")
AUTO_DEPTH_RATIO = 0.75  # the auto policy enables L_is below this fraction of the teacher's layers (paper BP 6)


@dataclass(frozen=True)
class StatePair:
    site: Site
    teacher: int
    student: int

    def __str__(self) -> str:
        return f"{self.teacher}:{self.student}" + ("" if self.site == "block" else f"@{self.site}")


def parse_layer_map(spec: str | None) -> list[tuple[int, int]]:
    """'t:s,t:s' -> [(t, s), ...] hidden-state index pairs; empty/'off'/'none' -> []. ('auto' is not a map.)"""
    if spec is None or spec.strip().lower() in OFF:
        return []
    pairs = []
    for part in spec.split(","):
        try:
            t, s = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"bad is_layers entry {part!r}; expected 'teacher:student' integers, e.g. '0:0,8:4', "
                             f"or '{AUTO}', or 'off'") from None
        pairs.append((t, s))
    return pairs


def check_layer_spec(spec: str | None) -> None:
    if spec != AUTO:
        parse_layer_map(spec)


def auto_layer_map(n_teacher: int, n_student: int, kept: list[int] | None = None) -> list[tuple[int, int]]:
    """Embedding output plus block outputs when the student keeps fewer than 3/4 of the teacher's layers; []
    otherwise. `kept`: the teacher blocks the student's were copied from (a depth prune's record): student block s
    is matched with the block it is a copy of; without it, proportionally (student block s -> teacher block
    round(s * Lt / Ls)). The student's last state is left out: it is the final norm's output, which the logit loss
    already matches."""
    if n_student >= AUTO_DEPTH_RATIO * n_teacher:
        return []
    if kept is not None:  # hidden state s is block s-1's output; teacher state k+1 is block k's
        return [(0, 0)] + [(kept[s - 1] + 1, s) for s in range(1, n_student)]
    return [(0, 0)] + [(int(s * n_teacher / n_student + 0.5), s) for s in range(1, n_student)]


def kept_layers_for(record: dict | None, n_teacher: int, teacher_params: int, n_student: int) -> list[int] | None:
    """The teacher blocks a pruned student kept, from its pruning record, when the distillation teacher is the model
    it was pruned from (same layer and parameter counts); None otherwise."""
    kept = (record or {}).get("kept_layers")
    if (not kept or len(kept) != n_student or max(kept) >= n_teacher
            or record.get("teacher_parameters") != teacher_params):
        return None
    return list(kept)


def resolve_pairs(spec: str | None, sites: list[str], n_teacher: int, n_student: int,
                  kept: list[int] | None = None) -> tuple[list[StatePair], str]:
    """The state pairs to compare, and one line saying how they were chosen (empty when given explicitly)."""
    note = ""
    if spec == AUTO:
        layer_map = auto_layer_map(n_teacher, n_student, kept)
        if layer_map:
            how = "each block with the teacher block it was copied from" if kept else "proportionally"
            note = (f"is_layers auto: the student keeps {n_student} of the teacher's {n_teacher} layers (< 3/4), so "
                    f"L_is is on ({how}): {','.join(f'{t}:{s}' for t, s in layer_map)}")
    else:
        layer_map = parse_layer_map(spec)
    for t, s in layer_map:
        if not (0 <= t <= n_teacher and 0 <= s <= n_student):
            raise ValueError(f"is_layers pair {t}:{s} out of range: teacher has hidden states 0..{n_teacher}, "
                             f"student 0..{n_student}")
    unknown = [x for x in sites if x not in SITES]
    if unknown:
        raise ValueError(f"unknown is_sites entry {unknown[0]!r}; choose from {', '.join(SITES)}")
    pairs = [StatePair(site, t, s) for site in dict.fromkeys(sites) for t, s in layer_map
             if site == "block" or (t > 0 and s > 0)]
    return pairs, note


def qkv_widths(config) -> tuple[int, int, int]:
    """Output widths of a layer's query, key and value projections (K and V are narrower under GQA)."""
    q, kv = config.num_attention_heads * head_dim(config), num_kv_heads(config) * head_dim(config)
    return q, kv, kv


def check_relation_heads(student_config, teacher_config, heads: int) -> None:
    """L_att splits every Q, K and V width of both models into `heads` relation heads: they must divide evenly."""
    widths = {"teacher": qkv_widths(teacher_config), "student": qkv_widths(student_config)}
    if heads < 1 or any(w % heads for ws in widths.values() for w in ws):
        shown = "; ".join(f"{who} q/k/v {'/'.join(map(str, ws))}" for who, ws in widths.items())
        raise ValueError(f"att_relation_heads={heads} must divide every query/key/value width ({shown})")


def build_projections(n_pairs: int, h_student: int, h_teacher: int, kind: str, seed: int) -> nn.ModuleList:
    """Linear(h_s, h_t) with bias: one shared by every pair (NVIDIA's `ProjectionLayer`) or one per pair. Identity
    with zero bias when the widths match; seeded, so every process and run starts from the same projection."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projs = nn.ModuleList(nn.Linear(h_student, h_teacher, bias=True)
                              for _ in range(1 if kind == "shared" else n_pairs))
    if h_student == h_teacher:
        for p in projs:
            nn.init.eye_(p.weight)
            nn.init.zeros_(p.bias)
    return projs


def pair_projections(projs: nn.ModuleList, n_pairs: int) -> list[nn.Module]:
    """The projection of each pair: the shared one for all, or each its own."""
    return list(projs) if len(projs) == n_pairs else [projs[0]] * n_pairs


class StateReader:
    """Reads one model's side of the state pairs: hidden states from the forward's output, MLP inputs and attention
    (q, k, v) tuples by hooks that record only inside `capturing()` (so a gradient-checkpointing recompute does not
    keep tensors alive)."""

    def __init__(self, model: nn.Module, indices: list[tuple[Site, int]]):
        self.indices = indices
        self.hidden = sorted({i for site, i in indices if site == "block"})
        self._mlp: dict[int, torch.Tensor] = {}
        self._active = False
        self._handles = []
        self._att: dict[int, dict[str, torch.Tensor]] = {}
        mlp_layers = sorted({i for site, i in indices if site == "mlp_input"})
        att_layers = sorted({i for site, i in indices if site == "attention"})
        if not (mlp_layers or att_layers):
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        spec = get_arch(base.config)
        layers = spec.decoder_layers(base)
        self._qkv_split = list(qkv_widths(base.config))
        for i in mlp_layers:
            self._handles.append(spec.mlp_input(layers[i - 1]).register_forward_pre_hook(
                self._hook(i), with_kwargs=True))
        # the projections' outputs: Q and K before rotary embedding (and before Qwen3/Gemma3's q/k norms), as in
        # MiniLMv2, which relates the projected vectors themselves
        names = self._att_names = [spec.qkv_proj] if spec.qkv_proj else [spec.q_proj, spec.k_proj, spec.v_proj]
        for i in att_layers:
            attn = spec.attention(layers[i - 1])
            for name in names:
                self._handles.append(attn.get_submodule(name).register_forward_hook(self._out_hook(i, name)))

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            if self._active:
                self._mlp[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _out_hook(self, i: int, name: str):
        def hook(module, args, output):
            if self._active:
                self._att.setdefault(i, {})[name] = output
        return hook

    def _qkv(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outs = [self._att[i][name] for name in self._att_names]  # q, k, v, or the one fused [q; k; v] output
        if len(outs) == 1:
            outs = outs[0].split(self._qkv_split, dim=-1)
        return tuple(outs)

    @contextmanager
    def capturing(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def states(self, hidden_states) -> list[torch.Tensor]:
        """Each pair's state on this side, in pair order; forgets the hooked tensors."""
        pick = {"block": lambda i: hidden_states[i], "mlp_input": self._mlp.__getitem__, "attention": self._qkv}
        out = [pick[site](i) for site, i in self.indices]
        self._mlp.clear()
        self._att.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def relation_log_probs(x: torch.Tensor, heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(X_r X_r^T / sqrt(d_r)) [B, R, S, S] of [B, S, W] vectors split into R relation heads of width
    d_r = W / R, over the earlier positions only (causal), and over unpadded ones (`key_mask` [B, S]) except itself.

    Under GQA the narrower K/V width is split into R heads as it is (no repeat to the query head count): a relation
    head then spans whole or partial KV heads, which is what concatenating the heads and re-splitting means.
    """
    b, s, w = x.shape
    xr = x.float().view(b, s, heads, w // heads).transpose(1, 2)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(w // heads)
    allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    if key_mask is not None:  # padded keys are never related to, but a row always keeps its own position
        allowed = allowed & (key_mask.bool()[:, None, None, :] | torch.eye(s, dtype=torch.bool, device=x.device))
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)


def _relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, rows: torch.Tensor, heads: int,
                 key_mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over the selected rows (`rows` [B, S] bool) of KL(teacher || student), averaged over relation heads."""
    log_ps = relation_log_probs(x_s, heads, key_mask)
    with torch.no_grad():
        log_pt = relation_log_probs(x_t, heads, key_mask)
    # masked entries: p_t = 0 there, and 0 * (-inf - -inf) must count as 0, not nan
    kl = torch.where(log_pt.isfinite(), log_pt.exp() * (log_pt - log_ps), 0.0).sum(-1)  # [B, R, S]
    return kl.mean(1)[:, :rows.shape[1]][rows].sum()


def attention_relation_loss(student_qkv: list[tuple[torch.Tensor, ...]], teacher_qkv: list[tuple[torch.Tensor, ...]],
                            rows: torch.Tensor, heads: int = 8, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_att (Minitron App. A.4 after MiniLMv2): for each pair, the KL(teacher || student) of the Q-Q, K-K and V-V
    relation distributions, averaged over relation heads and the three relations; summed over the rows selected by
    `rows` ([B, S'] bool over the first S' <= S positions: those the trainer scores) and over pairs, so it adds to
    L_is's per-pair token sums. `key_mask` [B, S]: the attention mask (padded positions are never related to).

    Each relation runs under activation checkpointing: only one [B, R, S, S] map is alive at a time, and none is
    kept for the backward pass (the q/k/v tensors are).
    """
    total = rows.new_zeros((), dtype=torch.float32)
    for s_qkv, t_qkv in zip(student_qkv, teacher_qkv, strict=True):
        for x_s, x_t in zip(s_qkv, t_qkv, strict=True):
            x_t = x_t.to(x_s.device)
            if torch.is_grad_enabled() and x_s.requires_grad:
                total = total + checkpoint(_relation_kl, x_s, x_t, rows, heads, key_mask, use_reentrant=False) / 3
            else:
                total = total + _relation_kl(x_s, x_t, rows, heads, key_mask) / 3
    return total
