"""Experiment 1 (paper Table 13): which batch x sequence aggregation of the activations ranks width best.

One importance pass of the teacher records all nine (batch, sequence) aggregations of every width score (mean, L2
norm, variance over each axis); each is pruned to two widths with no retraining and scored on the suite's two
held-out texts. The paper's default (batch L2, sequence mean) is the reference arm of each width.
"""

from __future__ import annotations

from common import Suite, importance, paired, pruned_arm, pyplot, save, teacher_arm, text_bars

NAME = "aggregation"
TITLE = "Aggregating activation importance over batch and sequence (paper Table 13)"
FINDING = ("Aggregating activations with the mean over the sequence and the L2 norm over the batch ranks width "
           "best: lowest LM loss after pruning, before retraining (Table 13); hf-minitron's default.")
AGGS = ("mean", "l2", "var")
REFERENCE = "l2-mean"


def widths(config) -> dict:
    from hf_minitron.archs import intermediate_size
    from hf_minitron.prune import PruneTarget

    ffn, hidden, step = intermediate_size(config), config.hidden_size, 16 * config.num_attention_heads
    mild = PruneTarget(ffn_size=round(ffn * 2 / 3 / 64) * 64)  # hidden: a multiple of the heads (transformers)
    strong = PruneTarget(ffn_size=round(ffn / 2 / 64) * 64, hidden_size=round(hidden * 0.78 / step) * step)
    return {f"ffn{mild.ffn_size}": mild, f"ffn{strong.ffn_size}-hidden{strong.hidden_size}": strong}


def run(suite: Suite) -> dict:
    from hf_minitron.prune import PruneConfig, prune_model

    rec = suite.experiment(NAME)
    samples, seq_len = (8, 256) if suite.quick else (32, 512)
    rec["protocol"] = {"calibration": f"{samples} x {seq_len} tokens", "retraining": "none"}
    teacher = suite.teacher()
    suite.arm(rec, "teacher", lambda: teacher_arm(suite))
    for width, target in widths(teacher.config).items():
        for b in AGGS:
            for s in AGGS:
                def arm(b=b, s=s, target=target):
                    student, _ = prune_model(teacher, importance(suite, samples, seq_len), target,
                                             PruneConfig(batch_agg=b, seq_agg=s))
                    return pruned_arm(suite, student)

                suite.arm(rec, f"{width}/{b}-{s}", arm)
    rec.update(verdict(rec))
    suite.save()
    return rec


def verdict(rec: dict) -> dict:
    """Per width, each aggregation against (L2, mean), text by text at 2 SE. not reproduced: one is better on a text
    and worse on none; inconclusive: one is better on one text and worse on the other (text-dependent), or (L2,
    mean) beats none of them on some text; reproduced: none better anywhere, and (L2, mean) beats one on each text."""
    arms = rec["arms"]
    notes, better, mixed, decisive = [], [], [], True
    for width in sorted({n.split("/")[0] for n in arms if "/" in n}):
        group = {n.split("/")[1]: a for n, a in arms.items() if n.startswith(width + "/")}
        if REFERENCE not in group:
            continue
        ref = group[REFERENCE]["eval"]
        best = min(group, key=lambda n: group[n]["eval"]["wikitext2"]["ppl"])
        notes.append(f"{width}: lowest WikiText-2 perplexity {best} ({group[best]['eval']['wikitext2']['ppl']:.1f}; "
                     f"(L2, mean) {ref['wikitext2']['ppl']:.1f})")
        for name, arm in group.items():
            if name == REFERENCE:
                continue
            cmp = paired(arm["eval"], ref)
            wins = [f"{t} by {-d['dlogppl']:.3f} +- {d['se']:.3f}" for t, d in cmp.items() if d["better"] == "a"]
            losses = [t for t, d in cmp.items() if d["better"] == "b"]
            if wins:
                (mixed if losses else better).append(f"{width}/{name} better on {', '.join(wins)} log-ppl"
                                                     + (f", worse on {', '.join(losses)}" if losses else ""))
        for text in ref:
            if not any(paired(ref, a["eval"])[text]["better"] == "a" for n, a in group.items() if n != REFERENCE):
                decisive = False
    if better:
        return {"verdict": "not reproduced", "why": "; ".join(better), "figures": notes}
    if mixed:
        return {"verdict": "inconclusive", "why": "text-dependent: " + "; ".join(mixed), "figures": notes}
    if decisive:
        return {"verdict": "reproduced", "why": "no aggregation beats (L2, mean) beyond 2 SE on either text, and it "
                                                "beats some on each", "figures": notes}
    return {"verdict": "inconclusive", "why": "(L2, mean) is not beaten, but on some text it beats no other "
                                              "aggregation beyond 2 SE", "figures": notes}


def plot(rec: dict, path) -> None:
    arms = rec["arms"]
    groups = sorted({n.split("/")[0] for n in arms if "/" in n})
    fig, axes = pyplot().subplots(1, len(groups), figsize=(6 * len(groups), 3.8), squeeze=False)
    for ax, width in zip(axes[0], groups):
        names = [f"{width}/{b}-{s}" for b in AGGS for s in AGGS if f"{width}/{b}-{s}" in arms]
        text_bars(ax, arms, names, arms.get("teacher"))
        ax.set_xticklabels([n.split("/")[1] for n in names])
        ax.set_title(f"{width} (batch-sequence aggregation), prune only")
    save(fig, path)
