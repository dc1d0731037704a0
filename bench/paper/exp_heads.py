"""Experiment 2 (paper section 2.3): which attention heads to keep, and whether merging the pruned ones helps.

Heads 9 -> 6 on SmolLM2 (one query head dropped per KV group, every layer; for another teacher, a third of each
group), prune only, from one importance pass. Arms: each head score (input: the norm of the head's output before
o_proj, the paper's; output: its contribution after o_proj, hf-minitron's default; ablation: the loss increase when
the head is zeroed) with and without the section-2.3 merge, and random choices of the same count (seeds 0-2).
"""

from __future__ import annotations

from common import Suite, importance, paired, pruned_arm, pyplot, save, teacher_arm, text_bars

NAME = "heads"
TITLE = "Head importance and the head merge (paper section 2.3)"
FINDING = ("Heads ranked by activation importance are kept, and the pruned heads' information is merged into the "
           "kept ones (section 2.3): an importance-ranked head prune should beat random choices of heads, and the "
           "merge should not hurt it.")
SCORES = ("input", "output", "ablation")
RANDOM_SEEDS = (0, 1, 2)


def target(config):
    from hf_minitron.archs import num_kv_heads
    from hf_minitron.prune import PruneTarget

    heads, kv = config.num_attention_heads, num_kv_heads(config)
    per_group = heads // kv
    return PruneTarget(num_heads=kv * max(1, per_group - max(1, per_group // 3)))


def run(suite: Suite) -> dict:
    import torch

    from hf_minitron.heads import head_ablation
    from hf_minitron.prune import PruneConfig, prune_model

    rec = suite.experiment(NAME)
    samples, seq_len = (8, 256) if suite.quick else (32, 512)
    abl_samples, abl_len = (2, 128) if suite.quick else (4, 256)
    teacher = suite.teacher()
    goal = target(teacher.config)
    rec["protocol"] = {"calibration": f"{samples} x {seq_len} tokens", "ablation": f"{abl_samples} x {abl_len}",
                       "heads": f"{teacher.config.num_attention_heads} -> {goal.num_heads}", "retraining": "none"}
    suite.arm(rec, "teacher", lambda: teacher_arm(suite))

    def scores():
        s = importance(suite, samples, seq_len)
        if "head_ablation_nll" not in s.tensors:
            s.tensors.update(head_ablation(teacher, [suite.calibration(abl_samples, abl_len)], progress=False))
        return s

    for score in SCORES:
        for merge in (False, True):
            suite.arm(rec, f"{score}{' + merge' if merge else ''}", lambda score=score, merge=merge: pruned_arm(
                suite, prune_model(teacher, scores(), goal, PruneConfig(head_score=score, merge_heads=merge))[0]))
    for seed in RANDOM_SEEDS:
        def random_arm(seed=seed):
            s = scores()
            saved = s.tensors["heads"]
            pick = torch.rand(saved.shape[2:], generator=torch.Generator().manual_seed(seed))
            s.tensors["heads"] = pick.expand_as(saved).double().contiguous()  # every aggregation: one random rank
            try:
                return pruned_arm(suite, prune_model(teacher, s, goal, PruneConfig(head_score="input"))[0])
            finally:
                s.tensors["heads"] = saved

        suite.arm(rec, f"random {seed}", random_arm)
    rec.update(verdict(rec))
    suite.save()
    return rec


def _against(arms: dict, name: str, others: list[str]) -> str:
    """'better' / 'worse' when `name` beats / loses to every one of `others` beyond 2 SE on both texts."""
    cmp = [paired(arms[name]["eval"], arms[o]["eval"]) for o in others]
    if all(d["better"] == "a" for c in cmp for d in c.values()):
        return "better"
    if all(d["better"] == "b" for c in cmp for d in c.values()):
        return "worse"
    return "inconclusive"


def verdict(rec: dict) -> dict:
    arms = rec["arms"]
    randoms = [n for n in arms if n.startswith("random")]
    vs_random = {s: _against(arms, s, randoms) for s in SCORES if s in arms}
    merge = {s: _against(arms, f"{s} + merge", [s]) for s in SCORES if f"{s} + merge" in arms}
    figures = [f"{n}: WikiText-2 {a['eval']['wikitext2']['ppl']:.1f}, pydoc {a['eval']['pydoc']['ppl']:.1f}"
               for n, a in arms.items()]
    why = (f"each score against every random choice (better/worse: on both texts, against all three, beyond 2 SE): "
           f"{vs_random}; with the merge against without: {merge}")
    if "worse" in merge.values():
        change = ", ".join(f"{s} {arms[s]['eval']['wikitext2']['ppl']:.0f} -> "
                           f"{arms[s + ' + merge']['eval']['wikitext2']['ppl']:.0f}" for s in merge)
        why += (f". The cause, measured: the merge as section 2.3 states it (kept query rows <- 2 kept - pruned) "
                f"raises every score's prune-only WikiText-2 perplexity ({change}); whether it pays back after "
                f"retraining is not measured here yet")
    if vs_random.get("input") == "better" and merge.get("input") != "worse":
        return {"verdict": "reproduced", "why": why, "figures": figures}
    if vs_random.get("input") == "worse" or merge.get("input") == "worse":
        return {"verdict": "not reproduced", "why": why, "figures": figures}
    return {"verdict": "inconclusive", "why": why, "figures": figures}


def plot(rec: dict, path) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 3.8))
    text_bars(ax, rec["arms"], [n for n in rec["arms"] if n != "teacher"], rec["arms"]["teacher"])
    ax.set_title("heads pruned, no retraining")
    save(fig, path)
