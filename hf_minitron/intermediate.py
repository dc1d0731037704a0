"""Intermediate-state distillation L_is (Minitron, arXiv 2407.14679 section 3 and appendix A.4): which states are
compared, how they are read, and the learned projection from the student's width to the teacher's.

A pair `t:s` names hidden-state indices as in HF `hidden_states` (0 = embedding output, i = output of block i; the
last index is after the final norm). Each pair is compared at each chosen site: `block` (that hidden state: L_emb for
0:0, L_o otherwise) and `mlp_input` (L_i: the residual stream entering block i's MLP, read by a forward pre-hook
on the norm `ArchSpec.mlp_input_norm`; pairs with index 0 have no MLP input). The attention-relation loss L_att is
not implemented.
"""

from __future__ import annotations

import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .archs import get_arch

Site = Literal["block", "mlp_input"]
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


def auto_layer_map(n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """Embedding output plus proportionally mapped block outputs when the student keeps fewer than 3/4 of the
    teacher's layers (student block s -> teacher block round(s * Lt / Ls)); [] otherwise. The student's last state
    is left out: it is the final norm's output, which the logit loss already matches."""
    if n_student >= AUTO_DEPTH_RATIO * n_teacher:
        return []
    return [(0, 0)] + [(int(s * n_teacher / n_student + 0.5), s) for s in range(1, n_student)]


def resolve_pairs(spec: str | None, sites: list[str], n_teacher: int, n_student: int) -> tuple[list[StatePair], str]:
    """The state pairs to compare, and one line saying how they were chosen (empty when given explicitly)."""
    note = ""
    if spec == AUTO:
        layer_map = auto_layer_map(n_teacher, n_student)
        if layer_map:
            note = (f"is_layers auto: the student keeps {n_student} of the teacher's {n_teacher} layers (< 3/4), so "
                    f"L_is is on: {','.join(f'{t}:{s}' for t, s in layer_map)}")
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
    """Reads one model's side of the state pairs: hidden states from the forward's output, MLP inputs by hooks
    that record only inside `capturing()` (so a gradient-checkpointing recompute does not keep tensors alive)."""

    def __init__(self, model: nn.Module, indices: list[tuple[Site, int]]):
        self.indices = indices
        self.hidden = sorted({i for site, i in indices if site == "block"})
        self._mlp: dict[int, torch.Tensor] = {}
        self._active = False
        self._handles = []
        mlp_layers = sorted({i for site, i in indices if site == "mlp_input"})
        if mlp_layers:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
            spec = get_arch(base.config)
            layers = spec.decoder_layers(base)
            for i in mlp_layers:
                self._handles.append(spec.mlp_input(layers[i - 1]).register_forward_pre_hook(
                    self._hook(i), with_kwargs=True))

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            if self._active:
                self._mlp[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    @contextmanager
    def capturing(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def states(self, hidden_states) -> list[torch.Tensor]:
        """Each pair's state on this side, in pair order; forgets the hooked tensors."""
        out = [hidden_states[i] if site == "block" else self._mlp[i] for site, i in self.indices]
        self._mlp.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
