"""Experiment 6 (paper section 3, Table 9-10; best practices 6 and 7): which distillation loss.

One depth-pruned student (the lowest-Block-Importance 27% of the teacher's layers dropped: more than a quarter, so
hf-minitron's automatic intermediate-state policy applies), retrained on the same tokens, windows, order, schedule
and seed with each logit loss alone (forward KL, reverse KL, MSE and cosine on the logits), and with forward KL plus
the intermediate-state loss L_is (embedding output + proportionally mapped block outputs, cosine, one shared
learned projection, dynamic weight alpha = L_logit / L_is).
"""

from __future__ import annotations

from common import (PER_STEP, SCHEDULE, Suite, compare, curves, describe, distilled_arm, held_out_text, importance,
                    out_of_domain, pruned_arm, pyplot, save, teacher_arm, text_bars)

NAME = "losses"
TITLE = "Loss choice: forward KL, reverse KL, MSE, cosine, and L_is on a depth-pruned student (best practices 6-7)"
FINDING = ("Forward KL divergence on the logits is the best single distillation loss (the paper's comparison with "
           "MSE, cosine and reverse KL, Table 9-10); when depth is reduced significantly, adding the intermediate-"
           "state losses (embedding and block outputs) to the logit loss helps (best practice 7).")
DROP_FRACTION = 0.27
LOGIT_ARMS = {"forward KL": "forward_kl", "reverse KL": "reverse_kl", "MSE logits": "mse", "cosine logits": "cosine"}
IS_ARM = "forward KL + L_is"  # block pairs mapped proportionally (the auto policy before kept-layer pairs)
IS_KEPT_ARM = "forward KL + L_is, kept-layer pairs"


def student(suite: Suite, with_plan: bool = False):
    from hf_minitron.prune import PruneConfig, PruneTarget, prune_model

    teacher = suite.teacher()
    samples, seq_len = (8, 256) if suite.quick else (32, 512)
    layers = teacher.config.num_hidden_layers
    target = PruneTarget(num_layers=layers - max(1, round(layers * DROP_FRACTION)))
    model, plan = prune_model(teacher, importance(suite, samples, seq_len), target, PruneConfig(depth_metric="bi"))
    return (model, plan) if with_plan else model


def kept_pairs_arm(suite: Suite, tokens: int) -> dict:
    """Forward KL + L_is with each student block paired with the teacher block it was copied from (what the build's
    auto policy does with a pruned folder's record; the loaded student here has no record, so the pairs are given)."""
    from hf_minitron.intermediate import auto_layer_map

    model, plan = student(suite, with_plan=True)
    pairs = auto_layer_map(suite.teacher().config.num_hidden_layers, len(plan.layers), plan.layers)
    return distilled_arm(suite, "is-kept", model, tokens, logit_loss="forward_kl",
                         is_layers=",".join(f"{t}:{s}" for t, s in pairs))


def run(suite: Suite) -> dict:
    rec = suite.experiment(NAME)
    tokens = suite.train_tokens
    layers = suite.teacher().config.num_hidden_layers
    rec["protocol"] = {"tokens per trained arm": tokens, "window": PER_STEP,
                       "schedule": SCHEDULE,
                       "student": f"{layers - max(1, round(layers * DROP_FRACTION))} of {layers} layers kept "
                                  "(lowest Block Importance dropped)"}
    suite.arm(rec, "teacher", lambda: teacher_arm(suite))
    suite.arm(rec, "pruned", lambda: pruned_arm(suite, student(suite)))
    for arm, loss in LOGIT_ARMS.items():
        suite.arm(rec, arm, lambda arm=arm, loss=loss: distilled_arm(suite, arm, student(suite), tokens,
                                                                     logit_loss=loss, is_layers="off"))
    suite.arm(rec, IS_ARM, lambda: distilled_arm(suite, "is", student(suite), tokens, logit_loss="forward_kl",
                                                 is_layers="auto"))
    suite.arm(rec, IS_KEPT_ARM, lambda: kept_pairs_arm(suite, tokens))
    rec.update(verdict(rec))
    suite.save()
    return rec


def _claim(rec_arms: dict, a: str, b: str) -> dict:
    return compare(rec_arms[a], rec_arms[b])


def verdict(rec: dict) -> dict:
    """Two claims, each decided out of the training distribution (pydoc, HellaSwag when measured) and contradicted
    on no measure: forward KL beats each other logit loss; adding L_is (its pairs as the build maps them: each block
    with the one it was copied from) beats forward KL alone. Reproduced when both hold, not reproduced when the data
    contradict either, else inconclusive. The proportionally mapped L_is arm is reported beside it."""
    arms = rec["arms"]
    if not all(n in arms for n in (*LOGIT_ARMS, IS_ARM, IS_KEPT_ARM)):
        return {"verdict": "inconclusive", "why": "not every arm has run", "figures": []}
    figures = [f"{n}: WikiText-2 {a['eval']['wikitext2']['ppl']:.2f}, pydoc {a['eval']['pydoc']['ppl']:.2f}"
               for n, a in arms.items()]
    comparisons = {f"forward KL - {other}": _claim(arms, "forward KL", other) for other in LOGIT_ARMS
                   if other != "forward KL"}
    for arm in (IS_KEPT_ARM, IS_ARM):
        comparisons[f"{arm} - forward KL"] = _claim(arms, arm, "forward KL")
    why = "; ".join(describe(f"{name} on {t}", d) for name, cmp in comparisons.items() for t, d in cmp.items())

    def holds(cmp_names) -> str:
        results = [comparisons[n] for n in cmp_names]
        if any("b" in (d["better"] for d in c.values()) for c in results):
            return "contradicted"
        return "holds" if all("a" in out_of_domain(c, held_out_text(rec)) for c in results) else "undecided"

    kl = holds([n for n in comparisons if n.startswith("forward KL -")])
    lis = holds([f"{IS_KEPT_ARM} - forward KL"])
    why = f"forward KL best: {kl}; L_is helps: {lis}. " + why
    if kl == lis == "holds":
        return {"verdict": "reproduced", "why": why, "figures": figures}
    if "contradicted" in (kl, lis):
        return {"verdict": "not reproduced", "why": why, "figures": figures}
    return {"verdict": "inconclusive", "why": why + " (within 2 SE)", "figures": figures}


def plot(rec: dict, path) -> None:
    arms = rec["arms"]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 3.8))
    # the losses have different units: each curve relative to its first value
    curves(left, arms, (*LOGIT_ARMS, IS_ARM, IS_KEPT_ARM), "logit loss / its first value", relative=True)
    text_bars(right, arms, [n for n in arms if n != "teacher"], arms["teacher"])
    right.set_title("held-out perplexity after equal tokens")
    save(fig, path)
