"""Experiment 5 (paper Fig. 2, Table 11; best practice 1): a family by chain vs one shot, at equal total tokens.

One shot: the teacher's MLPs cut to a third, then KD from the teacher for N tokens. Chain: the teacher's MLPs cut to
two thirds and distilled from the teacher for N/2 tokens; importance re-estimated on that distilled model, its MLPs
cut to the same third, then distilled from it (its parent, hf-minitron's default `kd_teacher` for a chained member)
for the other N/2 tokens. A third arm distils the chain's second step from the original teacher instead, to tell
the chain's pruning from its teacher, and a fourth gives the chain's final shape the one shot's whole budget from
the teacher (1.5x the total tokens: not an equal-budget arm), to tell a worse start from fewer tokens on the final
shape. Same windows, order, schedule and seed in every trained arm.
"""

from __future__ import annotations

from common import (PER_STEP, SCHEDULE, Suite, compare, curves, decide, describe, distilled_arm, held_out_text,
                    importance, pruned_arm, pyplot, save, teacher_arm, text_bars)

NAME = "chain"
TITLE = "Iterative chain vs one shot at equal total tokens (paper Fig. 2, Table 11; best practice 1)"
FINDING = ("To build a family, train the largest model, then prune and distill iteratively: each smaller member is "
           "pruned from the previous distilled one (15B -> 8B -> 4B beats 15B -> 4B in Table 11).")
CHAIN, ONE_SHOT, CHAIN_FROM_TEACHER = "chain + KD", "one shot + KD", "chain + KD from the teacher"
CHAIN_START = "chain start + one shot's KD"  # the chain's final shape, the one shot's tokens and teacher


def widths(config) -> tuple[int, int]:
    """(middle, final) MLP sizes: two thirds and one third of the teacher's, multiples of 8."""
    from hf_minitron.archs import intermediate_size

    full = intermediate_size(config)
    return max(8, round(full * 2 / 3 / 8) * 8), max(8, round(full / 3 / 8) * 8)


def _calibration_shape(suite: Suite) -> tuple[int, int]:
    return (8, 256) if suite.quick else (32, 512)


def _cut(model, scores, ffn: int):
    from hf_minitron.prune import PruneConfig, PruneTarget, prune_model

    return prune_model(model, scores, PruneTarget(ffn_size=ffn), PruneConfig())[0]


def middle(suite: Suite, tokens: int) -> tuple[object, dict]:
    """The chain's distilled middle model (trained once per run; a resumed run trains it again, same seed) and its
    arm record."""
    if "chain_middle" not in suite._cache:
        mid_ffn, _ = widths(suite.teacher().config)
        model = _cut(suite.teacher(), importance(suite, *_calibration_shape(suite)), mid_ffn)
        arm = distilled_arm(suite, "middle", model, tokens // 2)
        suite._cache["chain_middle"] = model, arm
    return suite._cache["chain_middle"]


def chained_student(suite: Suite, tokens: int):
    """The final width cut from the distilled middle model, by importance re-estimated on it (once per run: every
    chain arm cuts the same student)."""
    from hf_minitron.importance import ImportanceConfig, compute_importance

    mid, _ = middle(suite, tokens)
    _, final_ffn = widths(suite.teacher().config)
    if "chain_scores" not in suite._cache:
        suite._cache["chain_scores"] = compute_importance(mid, suite.calibration(*_calibration_shape(suite)),
                                                          ImportanceConfig(depth_ppl_samples=0, seed=suite.seed),
                                                          progress=False)
    return _cut(mid, suite._cache["chain_scores"], final_ffn)


def run(suite: Suite) -> dict:
    rec = suite.experiment(NAME)
    tokens = suite.train_tokens
    mid_ffn, final_ffn = widths(suite.teacher().config)
    from hf_minitron.archs import intermediate_size

    full = intermediate_size(suite.teacher().config)
    rec["protocol"] = {"tokens per trained arm": tokens, "chain": f"MLP {full} -> {mid_ffn} (KD {tokens // 2} "
                       f"tokens from the teacher) -> {final_ffn} (KD {tokens // 2} tokens from the middle model)",
                       "one shot": f"MLP {full} -> {final_ffn} (KD {tokens} tokens from the teacher)",
                       "window": PER_STEP, "schedule": SCHEDULE}
    scores = importance(suite, *_calibration_shape(suite))
    suite.arm(rec, "teacher", lambda: teacher_arm(suite))
    suite.arm(rec, "one shot, prune only", lambda: pruned_arm(suite, _cut(suite.teacher(), scores, final_ffn)))
    suite.arm(rec, ONE_SHOT, lambda: distilled_arm(suite, "one-shot", _cut(suite.teacher(), scores, final_ffn),
                                                   tokens))
    suite.arm(rec, "middle + KD", lambda: dict(middle(suite, tokens)[1]))
    suite.arm(rec, "chain, prune only", lambda: pruned_arm(suite, chained_student(suite, tokens)))
    suite.arm(rec, CHAIN, lambda: distilled_arm(suite, "chain", chained_student(suite, tokens), tokens // 2,
                                                teacher=middle(suite, tokens)[0]))
    suite.arm(rec, CHAIN_FROM_TEACHER, lambda: distilled_arm(suite, "chain-t", chained_student(suite, tokens),
                                                             tokens // 2))
    suite.arm(rec, CHAIN_START, lambda: distilled_arm(suite, "chain-start", chained_student(suite, tokens), tokens))
    rec.update(verdict(rec))
    suite.save()
    return rec


def verdict(rec: dict) -> dict:
    """The chain must beat one shot beyond 2 SE out of the training distribution and not lose on the other text."""
    arms = rec["arms"]
    if not all(n in arms for n in (CHAIN, ONE_SHOT)):
        return {"verdict": "inconclusive", "why": "not every arm has run", "figures": []}
    figures = [f"{n} ({a.get('params', 0) / 1e6:.1f}M): WikiText-2 {a['eval']['wikitext2']['ppl']:.2f}, pydoc "
               f"{a['eval']['pydoc']['ppl']:.2f}" for n, a in arms.items()]
    comparisons = {f"{CHAIN} - {ONE_SHOT}": compare(arms[CHAIN], arms[ONE_SHOT])}
    if CHAIN_FROM_TEACHER in arms:
        comparisons[f"{CHAIN} - {CHAIN_FROM_TEACHER}"] = compare(arms[CHAIN], arms[CHAIN_FROM_TEACHER])
    why = "; ".join(describe(f"{name} on {t}", d) for name, cmp in comparisons.items() for t, d in cmp.items())
    if CHAIN_START in arms:
        why += ". " + _start_or_tokens(compare(arms[CHAIN_START], arms[ONE_SHOT]))
    return decide(comparisons[f"{CHAIN} - {ONE_SHOT}"], why, figures, held_out_text(rec))


def _start_or_tokens(cmp: dict) -> str:
    """Whether the chain's start, given the one shot's tokens on the final shape, beats the one shot's start."""
    figures = "; ".join(describe(f"{CHAIN_START} - {ONE_SHOT} on {t}", d) for t, d in cmp.items())
    wins = {d["better"] for d in cmp.values()}
    if wins == {"a"}:
        cause = ("the chain's start is better everywhere once its final shape gets the one shot's tokens, so at equal "
                 "total tokens it loses by the half of the budget its middle member spends")
    elif "b" in wins:
        cause = "even with the one shot's tokens on its final shape the chain's start does not catch up"
    else:
        cause = "with the one shot's tokens on its final shape the chain's start is level with it"
    return f"Measured cause: {cause} ({figures})"


def plot(rec: dict, path) -> None:
    arms = rec["arms"]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 3.8))
    curves(left, arms, ("middle + KD", CHAIN, CHAIN_FROM_TEACHER, CHAIN_START, ONE_SHOT), "KD loss (forward KL)")
    text_bars(right, arms, [n for n in arms if n != "teacher"], arms["teacher"])
    right.set_title("held-out perplexity, equal total tokens")
    save(fig, path)
