"""Cost accounting of a build, from its manifest: tokens and FLOPs per member against training it from scratch.

Training FLOPs are estimated as 6 * N * tokens for the model being trained plus 2 * N * tokens for teacher forward
passes (importance: 2 * N * tokens). A member's lineage cost adds its ancestors' (the 4B of a 15B -> 8B -> 4B
chain owes the 8B's distillation too). The build's "N x fewer tokens" figure is the from-scratch tokens of all
members (`cost.scratch_tokens`, e.g. the teacher's pretraining tokens) over all tokens the build used.
What a build will cost before it runs (the plan it prints, and --dry-run): plan.py.
"""

from __future__ import annotations

from pathlib import Path

from .rundir import INSTRUCT_SUFFIX, MANIFEST, TEACHER
from .utils import si  # noqa: F401 (pipeline imports it from here)


def forward_flops(params: int, tokens: int) -> int:
    """Forward passes only (importance scoring, a teacher's share of distillation): 2 N per token."""
    return 2 * params * tokens


def train_flops(params: int, tokens: int, teacher_params: int = 0) -> int:
    """Training `params` on `tokens` (6 N per token), plus the forward passes of a distillation teacher."""
    return (6 * params + 2 * teacher_params) * tokens


def _done(run, key: str) -> dict:
    rec = run.record(key) or {}
    return rec if rec.get("status") == "done" else {}


def account(run, recipe) -> dict:
    """Tokens and FLOPs per member (own stages, and with its ancestors'), against training it from scratch."""
    members: dict[str, dict] = {}
    for m in recipe.members:
        keys = [f"{m.name}/{s}" for s in ("teacher-logits", "search", "prune", "distill", "sft")]
        if m.parent:  # importance on the parent is this member's calibration
            keys.append(f"importance/{m.parent}")
        own: dict[str, int] = {}
        flops = 0
        for key in keys:
            rec = _done(run, key)
            for kind, n in rec.get("tokens", {}).items():
                own[kind] = own.get(kind, 0) + n
            flops += rec.get("flops", 0)
        distilled = _done(run, f"{m.name}/distill")
        if not distilled:
            continue
        n = distilled.get("parameters")
        parent = members.get(m.parent, {})
        lineage = sum(own.values()) + parent.get("lineage_tokens", 0)
        scratch = m.scratch_tokens or recipe.cost.scratch_tokens
        members[m.name] = {
            "parameters": n, "parent": m.parent, "tokens": own, "total_tokens": sum(own.values()),
            "lineage_tokens": lineage, "flops": flops, "lineage_flops": flops + parent.get("lineage_flops", 0),
            "scratch_tokens": scratch, "scratch_flops": 6 * n * scratch if scratch else None,
            "fewer_tokens": round(scratch / lineage, 1) if scratch and lineage else None,
            "perplexity": _done(run, f"{m.name}/evaluate").get("results") or {},
        }
    teacher = _done(run, "importance/teacher")
    calib = teacher.get("tokens", {}).get("calibration", 0)
    used = calib + sum(v["total_tokens"] for v in members.values())
    scratch = sum(v["scratch_tokens"] or 0 for v in members.values())
    every = members and all(v["scratch_tokens"] for v in members.values())
    return {"members": members, "teacher_calibration_tokens": calib, "build_tokens": used,
            "build_flops": teacher.get("flops", 0) + sum(v["flops"] for v in members.values()),
            "scratch_tokens": scratch or None,
            "fewer_tokens": round(scratch / used, 1) if every and used else None}


def summary(run, recipe, cost: dict, teacher_params: int | None = None) -> str:
    """One screen: the members, their shape, perplexity and cost, and the build's cost against from scratch."""
    from transformers import AutoConfig

    from .archs import intermediate_size, num_kv_heads

    teacher_ppl = _done(run, f"{TEACHER}/evaluate").get("results", {}).get(TEACHER)
    lines = [f"family {recipe.name!r} from {recipe.teacher.source} -> {run.root}",
             f"{'member':<24}{'params':>8}{'hidden/ffn/heads/kv/layers':>28}{'ppl':>9}{'tokens':>9}{'FLOPs':>9}"
             f"{'vs scratch':>14}"]
    if teacher_ppl:
        lines.append(f"{'teacher':<24}{si(teacher_params):>8}{'':>28}{teacher_ppl:>9.2f}")
    for name, v in cost["members"].items():
        c = AutoConfig.from_pretrained(Path(run.member(name)))
        shape = "/".join(str(n) for n in (c.hidden_size, intermediate_size(c), c.num_attention_heads, num_kv_heads(c),
                                          c.num_hidden_layers))
        instruct = name + INSTRUCT_SUFFIX
        for variant in [name] + ([instruct] if instruct in v["perplexity"] else []):
            ppl = v["perplexity"].get(variant) or float("nan")
            ratio = f"{si(v['fewer_tokens'])}x fewer" if v["fewer_tokens"] else "-"
            lines.append(f"{variant:<24}{si(v['parameters']):>8}{shape:>28}{ppl:>9.2f}{si(v['lineage_tokens']):>9}"
                         f"{si(v['lineage_flops']):>9}{ratio:>14}")
    lines.append(f"build: {si(cost['build_tokens'])} tokens ({si(cost['teacher_calibration_tokens'])} teacher "
                 f"calibration), ~{si(cost['build_flops'])} training FLOPs")
    if cost["fewer_tokens"]:
        lines.append(f"from scratch: {si(cost['scratch_tokens'])} tokens for these members -> this build used "
                     f"{si(cost['fewer_tokens'])}x fewer tokens")
    skipped = sum(1 for _, a in run.actions if a == "skipped")
    lines.append(f"stages this run: {len(run.actions) - skipped} run, {skipped} skipped; manifest: "
                 f"{run.root / MANIFEST}")
    return "\n".join(lines)

