"""Experiment 3 (paper section 4.2, Fig. 8, best practice 2): width or depth, at the same parameter count.

Depth: a fifth of the teacher's layers dropped, the lowest Block Importance first. Width: every MLP cut to the size
(a multiple of 32) whose parameter count is closest to the depth student's. Both from one importance pass, prune
only and after the same KD tokens (same windows, order, schedule and seed).
"""

from __future__ import annotations

from common import (PER_STEP, SCHEDULE, Suite, compare, curves, decide, describe, distilled_arm, held_out_text,
                    importance, pruned_arm, pyplot, save, teacher_arm, text_bars)

NAME = "width_vs_depth"
TITLE = "Width vs depth at equal parameters (paper Fig. 8, best practice 2)"
FINDING = ("At the same parameter count, a width-pruned model (MLP neurons, heads, embedding channels) recovers "
           "better than a depth-pruned one after retraining, even where depth pruning looks competitive before "
           "retraining (Fig. 8; best practice 2: prefer width pruning at these scales).")
DEPTH_FRACTION = 0.2  # of the teacher's layers dropped


def targets(config):
    """(depth target, width target) of about the same parameter count."""
    from hf_minitron.archs import intermediate_size
    from hf_minitron.prune import PruneTarget, parameter_count

    layers = config.num_hidden_layers
    depth = PruneTarget(num_layers=layers - max(1, round(layers * DEPTH_FRACTION)))
    goal = parameter_count(config, depth)
    sizes = range(32, intermediate_size(config), 32)
    ffn = min(sizes, key=lambda f: abs(parameter_count(config, PruneTarget(ffn_size=f)) - goal))
    return depth, PruneTarget(ffn_size=ffn)


def students(suite: Suite) -> dict:
    from hf_minitron.prune import PruneConfig, prune_model

    teacher = suite.teacher()
    samples, seq_len = (8, 256) if suite.quick else (32, 512)
    scores = importance(suite, samples, seq_len)
    depth, width = targets(teacher.config)
    return {"depth": lambda: prune_model(teacher, scores, depth, PruneConfig(depth_metric="bi"))[0],
            "width": lambda: prune_model(teacher, scores, width, PruneConfig())[0]}


def run(suite: Suite) -> dict:
    rec = suite.experiment(NAME)
    tokens = suite.train_tokens
    depth, width = targets(suite.teacher().config)
    rec["protocol"] = {"tokens per trained arm": tokens, "window": PER_STEP,
                       "schedule": SCHEDULE,
                       "depth": f"{depth.num_layers} layers kept (lowest Block Importance dropped)",
                       "width": f"MLP {width.ffn_size} neurons per layer"}
    make = students(suite)
    suite.arm(rec, "teacher", lambda: teacher_arm(suite))
    for kind in ("depth", "width"):
        suite.arm(rec, kind, lambda kind=kind: pruned_arm(suite, make[kind]()))
        suite.arm(rec, f"{kind} + KD", lambda kind=kind: distilled_arm(suite, kind, make[kind](), tokens))
    rec.update(verdict(rec))
    suite.save()
    return rec


def verdict(rec: dict) -> dict:
    """After KD, width must beat depth beyond 2 SE on the out-of-distribution text (and not lose on the other)."""
    arms = rec["arms"]
    if not all(n in arms for n in ("depth", "width", "depth + KD", "width + KD")):
        return {"verdict": "inconclusive", "why": "not every arm has run", "figures": []}
    before = compare(arms["width"], arms["depth"])
    after = compare(arms["width + KD"], arms["depth + KD"])
    figures = [f"{n} ({a.get('params', 0) / 1e6:.1f}M): WikiText-2 {a['eval']['wikitext2']['ppl']:.2f}, pydoc "
               f"{a['eval']['pydoc']['ppl']:.2f}" for n, a in arms.items()]
    why = "; ".join(describe(f"width - depth {when} on {t}", d)
                    for when, cmp in (("before KD", before), ("after KD", after)) for t, d in cmp.items())
    return decide(after, why, figures, held_out_text(rec), " (within 2 SE after KD)")


def plot(rec: dict, path) -> None:
    arms = rec["arms"]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    curves(left, arms, ("depth + KD", "width + KD"), "KD loss (forward KL)")
    text_bars(right, arms, [n for n in ("depth", "width", "depth + KD", "width + KD") if n in arms], arms["teacher"])
    right.set_title("held-out perplexity, same parameter count")
    save(fig, path)
