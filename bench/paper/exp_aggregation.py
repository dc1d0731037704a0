"""Experiment 1 (paper Table 13): which batch x sequence aggregation of the activations ranks width best.

One importance pass of the teacher records all nine (batch, sequence) aggregations of every width score (mean, L2
norm, variance over each axis); each is pruned to two widths with no retraining and scored on the suite's two
held-out texts. The paper's default (batch L2, sequence mean) is the reference arm of each width.
"""

from __future__ import annotations

from common import Suite, importance, paired, pruned_arm, teacher_arm

NAME = "aggregation"
TITLE = "Aggregating activation importance over batch and sequence (paper Table 13)"
FINDING = ("Aggregating activations with the mean over the sequence and the L2 norm over the batch ranks width "
           "best: lowest LM loss after pruning, before retraining (Table 13); hf-minitron's default.")
AGGS = ("mean", "l2", "var")
REFERENCE = "l2-mean"


def widths(config) -> dict:
    from hf_minitron.archs import intermediate_size
    from hf_minitron.prune import PruneTarget

    ffn, hidden = intermediate_size(config), config.hidden_size
    mild = PruneTarget(ffn_size=round(ffn * 2 / 3 / 64) * 64)
    strong = PruneTarget(ffn_size=round(ffn / 2 / 64) * 64, hidden_size=round(hidden * 0.78 / 64) * 64)
    return {f"ffn{mild.ffn_size}": mild, f"ffn{strong.ffn_size}-hidden{strong.hidden_size}": strong}


def run(suite: Suite) -> dict:
    from hf_minitron.prune import PruneConfig, prune_model

    rec = suite.experiment(NAME)
    samples, seq_len = (8, 256) if suite.quick else (32, 512)
    rec["protocol"] = {"calibration": f"{samples} x {seq_len} tokens", "retraining": "none",
                       "eval": f"{suite.eval_windows} x {suite.eval_len} tokens per text"}
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
    """reproduced: at every width no aggregation beats (L2, mean) beyond 2 SE on either text and it beats at least
    one beyond 2 SE on each; not reproduced: one beats it; else inconclusive."""
    arms = rec["arms"]
    notes, beaten, decisive = [], [], True
    for width in sorted({n.split("/")[0] for n in arms if "/" in n}):
        group = {n.split("/")[1]: a for n, a in arms.items() if n.startswith(width + "/")}
        ref = group[REFERENCE]["eval"]
        best = min(group, key=lambda n: group[n]["eval"]["wikitext2"]["ppl"])
        notes.append(f"{width}: best {best} (WikiText-2 {group[best]['eval']['wikitext2']['ppl']:.1f}, reference "
                     f"{ref['wikitext2']['ppl']:.1f})")
        for name, arm in group.items():
            for text, d in paired(arm["eval"], ref).items():
                if name != REFERENCE and d["better"] == "a":
                    beaten.append(f"{width}/{name} on {text} by {-d['dlogppl']:.3f} +- {d['se']:.3f} log-ppl")
        for text in ref:
            if not any(paired(ref, a["eval"])[text]["better"] == "a" for n, a in group.items() if n != REFERENCE):
                decisive = False
    if beaten:
        return {"verdict": "not reproduced", "why": "beaten: " + "; ".join(beaten), "figures": notes}
    if decisive:
        return {"verdict": "reproduced", "why": "no aggregation beats (L2, mean) beyond 2 SE, and it beats some on "
                                                "each text", "figures": notes}
    return {"verdict": "inconclusive", "why": "(L2, mean) is not beaten, but it does not beat any other aggregation "
                                              "beyond 2 SE on every text at every width", "figures": notes}


def plot(rec: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = rec["arms"]
    groups = sorted({n.split("/")[0] for n in arms if "/" in n})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.6), squeeze=False)
    for ax, width in zip(axes[0], groups):
        names = [f"{b}-{s}" for b in AGGS for s in AGGS]
        for i, text in enumerate(("wikitext2", "pydoc")):
            ppl = [arms[f"{width}/{n}"]["eval"][text]["ppl"] for n in names if f"{width}/{n}" in arms]
            ax.bar([x + 0.4 * i for x in range(len(ppl))], ppl, width=0.4, label=text)
        ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=45, fontsize=8)
        ax.set_title(f"{width} (batch-seq), prune only")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
