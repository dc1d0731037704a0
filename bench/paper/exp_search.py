"""Experiment 7 (paper section 4.1, Fig. 9; best practice 4): does the search's short retraining rank candidates as
a longer distillation does?

The shapes within 5% of a budget (a quarter of the teacher's parameters removed; widths only, as the quickstart's
search: hidden size, heads, MLP), ranked three ways: by perplexity right after pruning, by hf-minitron's search
(LoRA + norms, and full-parameter KD, each for its short budget, stopping once the ranking holds), and after a
longer full KD of every candidate (the same tokens, windows, order, schedule and seed). The search scores on
held-out windows of the training text; the longer KD's order is read on the suite's held-out texts. Kendall tau of
each short ranking against the long one.
"""

from __future__ import annotations

from common import (Suite, distilled_arm, held_out_text, importance, paired, pyplot, save, teacher_arm, text_bars,
                    train_text)

NAME = "search_ranking"
TITLE = "Search: does the short-retraining ranking agree with a longer KD (paper Fig. 9, Kendall tau)?"
FINDING = ("Rankings of pruned candidates right after pruning do not predict the ranking after retraining, but a "
           "short retraining (~300 steps in the paper) does: the order stabilises early, so a lightweight "
           "retraining of each candidate picks the architecture (Fig. 9; best practice 4).")
BUDGET_SHARE = 0.75
MODES = ("lora", "full")
HOLDOUT = 0.05  # of the training documents: the search scores on these, the trained arms still see them


def search_settings(suite: Suite, mode: str):
    from hf_minitron.search import SearchConfig

    return SearchConfig(mode=mode, max_candidates=4, tokens=1024 if suite.quick else 4096, seq_len=256,
                        batch_size=4, lr=2e-4, lora_r=8, lora_alpha=16, eval_windows=4, eval_seq_len=256,
                        multiple=8 if suite.quick else 64, stable_evals=2)


def budget(suite: Suite) -> int:
    return round(sum(p.numel() for p in suite.teacher().parameters()) * BUDGET_SHARE)


def searched(suite: Suite, mode: str) -> dict:
    """hf-minitron's search on the teacher in `mode`: every candidate's shape and scores (search.json)."""
    import json
    import tempfile

    from hf_minitron.data import TextSource, load_text_dataset, split_holdout, token_windows
    from hf_minitron.search import run_search

    source = TextSource(train_text(suite.data_dir, suite.train_on))
    search = search_settings(suite, mode)
    windows = token_windows(source, suite.tokenizer(), search.eval_seq_len, search.eval_windows, holdout=HOLDOUT)
    documents = split_holdout(load_text_dataset(source), HOLDOUT)[0]
    scores = importance(suite, *((8, 256) if suite.quick else (32, 512)))
    with tempfile.TemporaryDirectory() as out:
        run_search(suite.teacher(), scores, suite.teacher(), suite.tokenizer(), documents, windows, budget(suite),
                   search, out, seed=suite.seed, progress=False, log=lambda *_: None)
        result = json.loads(open(f"{out}/search.json").read())
    from hf_minitron.search_space import Candidate

    return {"candidates": [{"name": Candidate(c["shape"], c["params"]).name,
                            **{k: c[k] for k in ("shape", "params", "score_before", "score_after", "tokens")}}
                           for c in result["candidates"]], "tokens": result["tokens"]}


def run(suite: Suite) -> dict:
    from hf_minitron.prune import PruneTarget, prune_model

    rec = suite.experiment(NAME)
    tokens = suite.kd_tokens or (8 * 1024 if suite.quick else 16 * 1024)
    rec["protocol"] = {"budget": f"{BUDGET_SHARE:.0%} of the teacher's parameters, +-5%, widths only",
                       "search": {m: f"{search_settings(suite, m).tokens} tokens per candidate at most, "
                                     "stopping once the ranking holds twice" for m in MODES},
                       "longer KD": f"{tokens} tokens per candidate, 4 x 256 per step, AdamW 2e-4, cosine"}
    suite.arm(rec, "teacher", lambda: teacher_arm(suite))
    for mode in MODES:
        suite.arm(rec, f"search ({mode})", lambda mode=mode: searched(suite, mode))
    scores = importance(suite, *((8, 256) if suite.quick else (32, 512)))
    for c in rec["arms"][f"search ({MODES[0]})"]["candidates"]:
        def long_kd(shape=c["shape"], name=c["name"]):
            student = prune_model(suite.teacher(), scores, PruneTarget(**shape), None)[0]
            return {**distilled_arm(suite, name, student, tokens), "shape": shape}
        suite.arm(rec, f"{c['name']} + KD", long_kd)
    rec.update(verdict(rec))
    suite.save()
    return rec


def _long_order(arms: dict, names: list[str], text: str) -> list[float]:
    """Each candidate's mean per-window log-perplexity on `text` after the longer KD."""
    return [sum(arms[f"{n} + KD"]["eval"][text]["nll"]) / len(arms[f"{n} + KD"]["eval"][text]["nll"]) for n in names]


def verdict(rec: dict) -> dict:
    """Reproduced when the short search's ranking agrees with the longer KD's better than the prune-only ranking
    does, on both texts, and the search's winner is not beaten after the longer KD beyond 2 SE; not reproduced when
    it is beaten (out of the training distribution) or the prune-only ranking agrees at least as well."""
    from hf_minitron.search import kendall_tau

    arms = rec["arms"]
    lora = arms.get(f"search ({MODES[0]})")
    if not lora or not all(f"{c['name']} + KD" in arms for c in lora["candidates"]):
        return {"verdict": "inconclusive", "why": "not every arm has run", "figures": []}
    names = [c["name"] for c in lora["candidates"]]
    taus, figures = {}, []
    for text in ("wikitext2", "pydoc"):
        long = _long_order(arms, names, text)
        taus[("pruned", text)] = kendall_tau([c["score_before"] for c in lora["candidates"]], long)
        for mode in MODES:
            if f"search ({mode})" in arms:
                short = {c["name"]: c["score_after"] for c in arms[f"search ({mode})"]["candidates"]}
                taus[(mode, text)] = kendall_tau([short[n] for n in names], long)
    for c in lora["candidates"]:
        a = arms[f"{c['name']} + KD"]
        figures.append(f"{c['name']} {c['shape']} ({c['params'] / 1e6:.1f}M): pruned {c['score_before']:.1f}, "
                       f"search {c['score_after']:.1f}; after KD WikiText-2 {a['eval']['wikitext2']['ppl']:.2f}, "
                       f"pydoc {a['eval']['pydoc']['ppl']:.2f}")
    winner = min(lora["candidates"], key=lambda c: c["score_after"])["name"]
    ood = held_out_text(rec)
    beaten = [n for n in names if n != winner
              and paired(arms[f"{n} + KD"]["eval"], arms[f"{winner} + KD"]["eval"])[ood]["better"] == "a"]
    why = ", ".join(f"tau({k}, long KD) on {t} {v:+.2f}" for (k, t), v in taus.items())
    why += f"; the LoRA search's winner {winner} " + (f"is beaten after the longer KD by {', '.join(beaten)} beyond "
                                                      f"2 SE on {ood}" if beaten else "is not beaten beyond 2 SE")
    better = all(taus[("lora", t)] > taus[("pruned", t)] for t in ("wikitext2", "pydoc"))
    if all(taus[("lora", t)] == taus[("pruned", t)] for t in ("wikitext2", "pydoc")):
        why += ("; the prune-only ranking agrees with the longer KD exactly as well as the search's: retraining was "
                "not needed to rank these candidates")
    if not beaten and better:
        return {"verdict": "reproduced", "why": why, "figures": figures}
    if beaten or all(taus[("lora", t)] <= taus[("pruned", t)] for t in ("wikitext2", "pydoc")):
        return {"verdict": "not reproduced", "why": why, "figures": figures}
    return {"verdict": "inconclusive", "why": why + " (the texts disagree)", "figures": figures}


def plot(rec: dict, path) -> None:
    arms = rec["arms"]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 3.8))
    lora = arms.get(f"search ({MODES[0]})", {"candidates": []})["candidates"]
    names = [c["name"] for c in lora if f"{c['name']} + KD" in arms]
    for mode, marker in zip(("pruned", *MODES), "osx"):
        src = lora if mode == "pruned" else arms.get(f"search ({mode})", {"candidates": []})["candidates"]
        key = "score_before" if mode == "pruned" else "score_after"
        by = {c["name"]: c[key] for c in src}
        xs = [arms[f"{n} + KD"]["eval"][held_out_text(rec)]["ppl"] for n in names if n in by]
        left.scatter(xs, [by[n] for n in names if n in by], marker=marker, label=mode)
    left.set_xlabel(f"{held_out_text(rec)} perplexity after the longer KD")
    left.set_ylabel("search-window perplexity")
    left.set_yscale("log")
    left.legend(fontsize=8)
    text_bars(right, arms, [f"{n} + KD" for n in names], arms.get("teacher"))
    right.set_title("after the longer KD")
    save(fig, path)

