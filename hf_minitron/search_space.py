"""The search space of the architecture search (paper Table 12): one list of values per axis, every combination near
the budget a candidate, and a spread of shapes when there are too many.

Axes: hidden size, query heads (each KV group keeps the same number), MLP size (or expansion factors: MLP size =
factor x hidden size, rounded to `multiple`) and, when the search asks for depth, the layer count. Nothing is
solved to hit the budget: each combination within budget x (1 +- tolerance) is feasible. When more than
`max_candidates` are, a farthest-point selection in normalised shape space keeps the shapes that differ most
(deterministic, starting from the widest; among equally wide shapes the one nearest the budget, then the one keeping
the most heads), rather than whichever happen to round closest to the budget.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

from .archs import count_parameters, get_arch, head_dim, intermediate_size, num_kv_heads
from .prune import PruneTarget, student_config

@dataclass
class Candidate:
    """One shape near the budget and what the search measured on it (perplexity: lower is better)."""

    shape: dict  # hidden_size, ffn_size, num_heads, num_kv_heads, num_layers
    params: int
    score_before: float | None = None
    score_after: float | None = None
    tokens: int = 0
    rank: int | None = None
    curve: list = field(default_factory=list)  # {"step", "tokens", "perplexity"} after each retraining interval
    base_sha256: str | None = None  # fingerprint of the pruned base (search_train.fingerprint)

    def target(self) -> PruneTarget:
        return PruneTarget(**self.shape)

    @property
    def name(self) -> str:
        s = self.shape
        return f"{s['hidden_size']}-{s['ffn_size']}-{s['num_heads']}-{s['num_kv_heads']}-{s['num_layers']}"


def _grid(full: int, multiple: int, low: float) -> list[int]:
    """Multiples of `multiple` from low*full to full, plus full itself."""
    values = [v for v in range(multiple, full + 1, multiple) if v >= low * full]
    return sorted(set(values) | {full})


def _count(config, shape: dict) -> int:
    """Parameters of a shape, on a shallow copy of the config (fast enough to call for every grid point)."""
    c = copy.copy(config)
    c.hidden_size, c.num_attention_heads = shape["hidden_size"], shape["num_heads"]
    c.num_key_value_heads, c.num_hidden_layers = shape["num_kv_heads"], shape["num_layers"]
    c.head_dim = head_dim(config)
    setattr(c, get_arch(config).intermediate_key, shape["ffn_size"])
    return count_parameters(c)


def _accepted(config, shape: dict) -> bool:
    """Whether the config class accepts the shape (some demand hidden % heads == 0 even with head_dim set)."""
    try:
        student_config(config, PruneTarget(**shape))
        return True
    except Exception:  # transformers' and huggingface_hub's validation errors share no base but Exception
        return False


def _check_values(values, low: int, high: int, key: str, ok=lambda v: True, why: str = "") -> list:
    bad = [v for v in values if not (low <= v <= high and ok(v))]
    if bad:
        raise ValueError(f"search.{key}: {bad} not possible for this base model (from {low} to {high}{why})")
    return sorted(set(values))


def axis_values(config, search) -> dict[str, list]:
    """The values each axis takes: the search's own lists, or defaults derived from the base model.

    hidden and MLP sizes: multiples of `multiple` from min_width x the base's (the MLP as factors of each hidden size
    instead when `mlp_ratios` is set); heads: multiples of the KV-head count (every count for MHA, where each head
    is its own group) from min_width x the base's; layers: the base's count, or min_depth x it up to all of them
    with `depth`.
    """
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, num_kv_heads(config)
    layers, ffn = config.num_hidden_layers, intermediate_size(config)
    group = heads // kv
    step = kv if group > 1 else 1
    if search.num_heads:
        head_list = _check_values(search.num_heads, step, heads, "num_heads", lambda h: h % step == 0,
                                  f", multiples of the {kv} KV heads" if group > 1 else "")
    else:
        head_list = [h for h in range(step, heads + 1, step) if h >= search.min_width * heads]
    if search.num_layers:
        layer_list = _check_values(search.num_layers, 1, layers, "num_layers")
    elif search.depth:
        layer_list = list(range(max(1, math.ceil(search.min_depth * layers)), layers + 1))
    else:
        layer_list = [layers]
    axes = {"hidden_size": _check_values(search.hidden_sizes, 1, hidden, "hidden_sizes") if search.hidden_sizes
            else _grid(hidden, search.multiple, search.min_width), "num_heads": head_list, "num_layers": layer_list}
    if search.mlp_ratios:
        return {**axes, "mlp_ratio": sorted(set(search.mlp_ratios))}
    return {**axes, "ffn_size": _check_values(search.ffn_sizes, 1, ffn, "ffn_sizes") if search.ffn_sizes
            else _grid(ffn, search.multiple, search.min_width)}


def mlp_size(ratio: float, hidden: int, base_ffn: int, multiple: int) -> int:
    """ratio x hidden rounded to a multiple of `multiple`; the base's own size when within half a step of it."""
    value = ratio * hidden
    if abs(value - base_ffn) <= multiple / 2:
        return base_ffn
    return max(multiple, round(value / multiple) * multiple)


def enumerate_candidates(config, budget: int, search) -> list[Candidate]:
    """Every combination of the axes' values within budget x (1 +- search.tolerance) that the config class
    accepts, nearest to the budget first. MLP sizes above the base's are left out (pruning cannot grow a matrix)."""
    axes = axis_values(config, search)
    kv, heads, base_ffn = num_kv_heads(config), config.num_attention_heads, intermediate_size(config)
    lo, hi = budget * (1 - search.tolerance), budget * (1 + search.tolerance)
    found = []
    for hidden, n_heads, n_layers in itertools.product(axes["hidden_size"], axes["num_heads"], axes["num_layers"]):
        shape = dict(hidden_size=hidden, ffn_size=base_ffn, num_heads=n_heads,
                     num_kv_heads=kv if heads // kv > 1 else n_heads, num_layers=n_layers)
        if "mlp_ratio" in axes:
            sizes = sorted({mlp_size(r, hidden, base_ffn, search.multiple) for r in axes["mlp_ratio"]})
        else:
            sizes = axes["ffn_size"]
        full = _count(config, shape)  # the count is linear in the MLP size: one more count gives the slope
        slope = full - _count(config, {**shape, "ffn_size": base_ffn - 1})
        fits = [f for f in sizes if f <= base_ffn and lo <= full - slope * (base_ffn - f) <= hi]
        if fits and _accepted(config, shape):
            found += [Candidate({**shape, "ffn_size": f}, full - slope * (base_ffn - f)) for f in fits]
    found.sort(key=lambda c: (abs(c.params - budget), -c.shape["hidden_size"]))
    return found


def _coords(found: list[Candidate]) -> list[list[float]]:
    """Each shape as (hidden, heads, MLP factor, layers), every axis scaled to [0, 1] over the feasible shapes."""
    raw = [[s["hidden_size"], s["num_heads"], s["ffn_size"] / s["hidden_size"], s["num_layers"]]
           for s in (c.shape for c in found)]
    lows, highs = [min(col) for col in zip(*raw)], [max(col) for col in zip(*raw)]
    return [[(v - lo) / (hi - lo) if hi > lo else 0.0 for v, lo, hi in zip(row, lows, highs)] for row in raw]


def spread(found: list[Candidate], n: int, budget: int) -> list[Candidate]:
    """At most `n` of `found`, chosen farthest-point first in normalised shape space from the widest (largest
    hidden size, then nearest the budget, then most query heads: in the quickstart's searches the shapes keeping every
    head won after LoRA); ties go to the shape nearer the budget. Returned nearest-first."""
    if len(found) <= n:
        return list(found)
    xs = _coords(found)
    near = [abs(c.params - budget) for c in found]
    shapes = [c.shape for c in found]
    first = min(range(len(found)), key=lambda i: (-shapes[i]["hidden_size"], near[i], -shapes[i]["num_heads"], i))
    chosen = [first]
    gap = [math.dist(x, xs[first]) for x in xs]
    while len(chosen) < n:
        j = min((i for i in range(len(found)) if i not in chosen), key=lambda i: (-gap[i], near[i], i))
        chosen.append(j)
        gap = [min(g, math.dist(x, xs[j])) for g, x in zip(gap, xs)]
    return sorted((found[i] for i in chosen), key=lambda c: (abs(c.params - budget), -c.shape["hidden_size"]))


def candidates_for(config, budget: int, search) -> list[Candidate]:
    """The candidates a search retrains: the feasible shapes, thinned to a spread of `search.max_candidates`;
    a one-line error when nothing fits."""
    found = enumerate_candidates(config, budget, search)
    if not found:
        raise ValueError(f"no shape within {search.tolerance:.0%} of {budget:,} parameters (base model: "
                         f"{count_parameters(config):,}; multiple {search.multiple}, min_width {search.min_width}, "
                         f"depth {'on' if search.depth or search.num_layers else 'off'})")
    return spread(found, search.max_candidates, budget)
