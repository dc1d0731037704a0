"""The reproduction suite (bench/paper/): its verdicts follow the paired figures; it runs, resumes and renders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "paper"))
import exp_aggregation  # noqa: E402
import exp_chain  # noqa: E402
import exp_heads  # noqa: E402
import exp_kd  # noqa: E402
import exp_losses  # noqa: E402
import exp_search  # noqa: E402
import exp_width_depth  # noqa: E402
from common import PYDOC_HOLDOUT, Suite, compare, paired, paired_hellaswag, pydoc_train_file  # noqa: E402


def _eval(*offsets: float) -> dict:
    """An arm's evaluation: per-window NLLs of 4 windows shifted by `offsets` (one per text)."""
    base = [2.0, 2.5, 3.0, 3.5]
    return {text: {"ppl": 0.0, "nll": [b + o + 0.001 * i for i, b in enumerate(base)]}
            for text, o in zip(("wikitext2", "pydoc"), offsets)}


def test_paired_differences_within_two_standard_errors_decide_nothing():
    a = {"t": {"nll": [1.0, 2.0, 3.0, 4.0]}}
    close = {"t": {"nll": [1.01, 1.99, 3.02, 3.98]}}
    far = {"t": {"nll": [1.5, 2.5, 3.5, 4.6]}}
    assert paired(a, close)["t"]["better"] is None
    assert paired(a, far)["t"]["better"] == "a" and paired(far, a)["t"]["better"] == "b"


def _hellaswag(hits: list[int]) -> dict:
    return {"acc_norm": sum(hits) / len(hits), "n": len(hits), "norm_hits": hits}


def test_hellaswag_is_compared_task_by_task_and_only_on_the_same_tasks():
    base = [1, 0] * 50
    better = [1, 1] * 10 + [1, 0] * 40  # 10 more tasks right, none lost
    assert paired_hellaswag({"hellaswag": _hellaswag(better)}, {"hellaswag": _hellaswag(base)})["better"] == "a"
    assert paired_hellaswag({"hellaswag": _hellaswag(base)}, {"hellaswag": _hellaswag(better)})["better"] == "b"
    assert paired_hellaswag({"hellaswag": _hellaswag(better[:60])}, {"hellaswag": _hellaswag(base)}) is None
    assert "hellaswag" not in compare({"eval": _eval(0, 0), "hellaswag": _hellaswag(base)}, {"eval": _eval(0, 0)})


def test_hellaswag_decides_the_kd_verdict_where_pydoc_cannot():
    base, better = [1, 0] * 50, [1, 1] * 10 + [1, 0] * 40
    arms = {"pruned + KD": {"eval": _eval(0.0, 0.0), "hellaswag": _hellaswag(better)},
            "pruned + CE": {"eval": _eval(-0.4, 0.0), "hellaswag": _hellaswag(base)},
            "random init + KD": {"eval": _eval(2.0, 2.0), "hellaswag": _hellaswag(base)}}
    result = exp_kd.verdict({"arms": arms})  # pydoc level with CE, HellaSwag better than both
    assert result["verdict"] == "reproduced" and "acc_norm +0.1000" in result["why"]
    arms["pruned + CE"]["hellaswag"] = _hellaswag(better)
    arms["pruned + KD"]["hellaswag"] = _hellaswag(base)  # now CE better on HellaSwag
    assert exp_kd.verdict({"arms": arms})["verdict"] == "not reproduced"


def test_a_hellaswag_loss_contradicts_the_chain():
    base, better = [1, 0] * 50, [1, 1] * 10 + [1, 0] * 40
    arms = {exp_chain.ONE_SHOT: {"eval": _eval(0.0, 0.0), "hellaswag": _hellaswag(better)},
            exp_chain.CHAIN: {"eval": _eval(-0.1, -0.3), "hellaswag": _hellaswag(base)}}
    assert exp_chain.verdict({"arms": arms})["verdict"] == "not reproduced"


def test_aggregation_verdicts():
    def rec(other_offset):
        arms = {f"w/{b}-{s}": {"eval": _eval(0.5, 0.5)} for b in exp_aggregation.AGGS for s in exp_aggregation.AGGS}
        arms["w/l2-mean"] = {"eval": _eval(0.0, 0.0)}
        arms["w/mean-mean"] = {"eval": _eval(other_offset, other_offset)}
        return {"arms": arms}

    assert exp_aggregation.verdict(rec(0.5))["verdict"] == "reproduced"
    assert exp_aggregation.verdict(rec(-0.3))["verdict"] == "not reproduced"
    mixed = rec(0.5)
    mixed["arms"]["w/l2-l2"] = {"eval": _eval(-0.3, 0.3)}  # better on one text, worse on the other
    assert exp_aggregation.verdict(mixed)["verdict"] == "inconclusive"
    tie = rec(0.0)
    tie["arms"] = {n: {"eval": _eval(0.0, 0.0)} for n in tie["arms"]}
    assert exp_aggregation.verdict(tie)["verdict"] == "inconclusive"


def test_kd_verdict_is_decided_out_of_the_training_distribution():
    arms = {"pruned + KD": {"eval": _eval(0.0, 0.0)}, "pruned + CE": {"eval": _eval(-0.4, 0.4)},
            "random init + KD": {"eval": _eval(2.0, 2.0)}}
    result = exp_kd.verdict({"arms": arms})  # CE better on WikiText-2 (its distribution is trained on), worse on pydoc
    assert result["verdict"] == "reproduced" and "CE wins" in result["why"]
    arms["pruned + CE"] = {"eval": _eval(0.4, -0.2)}  # CE better out of domain
    assert exp_kd.verdict({"arms": arms})["verdict"] == "not reproduced"


def test_the_reverse_split_decides_kd_on_wikitext2():
    arms = {"pruned + KD": {"eval": _eval(-0.4, 0.0)}, "pruned + CE": {"eval": _eval(0.0, -0.4)},
            "random init + KD": {"eval": _eval(2.0, 2.0)}}
    reverse = {"settings": {"train_on": "pydoc"}, "arms": arms}  # trained on pydoc: CE fits pydoc, KD wins WikiText-2
    result = exp_kd.verdict(reverse)
    assert result["verdict"] == "reproduced" and "distribution (pydoc) CE wins" in result["why"]
    assert exp_kd.verdict({"arms": arms})["verdict"] == "not reproduced"  # the same arms judged on pydoc


def test_the_reverse_split_trains_on_no_pydoc_document_it_evaluates():
    from hf_minitron.data import load_text_dataset, split_holdout

    kept, held_out = (part["text"] for part in split_holdout(load_text_dataset("pydoc-topics"), PYDOC_HOLDOUT))
    training = Path(pydoc_train_file()).read_text()
    assert all(doc[:200] in training for doc in kept) and not any(doc[:200] in training for doc in held_out)
    assert Suite(train_on="pydoc").record_name("kd_vs_ce") == "kd_vs_ce@pydoc"
    assert Suite().record_name("kd_vs_ce") == "kd_vs_ce"


def test_width_vs_depth_verdict_follows_the_arms_after_kd():
    arms = {"depth": {"eval": _eval(-0.3, -0.3)}, "width": {"eval": _eval(0.0, 0.0)},
            "depth + KD": {"eval": _eval(0.5, 0.5)}, "width + KD": {"eval": _eval(0.0, 0.0)}}
    assert exp_width_depth.verdict({"arms": arms})["verdict"] == "reproduced"  # depth better before KD only
    arms["depth + KD"] = {"eval": _eval(-0.2, 0.0)}
    assert exp_width_depth.verdict({"arms": arms})["verdict"] == "not reproduced"
    arms["depth + KD"] = {"eval": _eval(0.0, 0.0)}
    assert exp_width_depth.verdict({"arms": arms})["verdict"] == "inconclusive"


def test_width_and_depth_students_have_about_the_same_parameters():
    from transformers import LlamaConfig

    from hf_minitron.prune import parameter_count

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=10,
                         num_attention_heads=4, num_key_value_heads=2)
    depth, width = exp_width_depth.targets(config)
    assert depth.num_layers == 8 and width.ffn_size < 1024
    assert parameter_count(config, width) == pytest.approx(parameter_count(config, depth), rel=0.02)


def test_losses_verdict_needs_both_claims():
    good = {"forward KL": _eval(0.0, 0.0), "reverse KL": _eval(0.3, 0.3), "MSE logits": _eval(0.3, 0.3),
            "cosine logits": _eval(0.3, 0.3), exp_losses.IS_KEPT_ARM: _eval(-0.2, -0.2),
            exp_losses.IS_ARM: _eval(0.1, 0.1)}  # the proportional pairs are reported, the kept-layer ones decide
    arms = {n: {"eval": e} for n, e in good.items()}
    assert exp_losses.verdict({"arms": arms})["verdict"] == "reproduced"
    arms[exp_losses.IS_KEPT_ARM] = {"eval": _eval(0.0, 0.0)}
    result = exp_losses.verdict({"arms": arms})
    assert result["verdict"] == "inconclusive" and "L_is helps: undecided" in result["why"]
    arms["reverse KL"] = {"eval": _eval(-0.2, -0.2)}
    assert exp_losses.verdict({"arms": arms})["verdict"] == "not reproduced"


def test_chain_verdict_compares_the_chain_with_one_shot():
    arms = {exp_chain.ONE_SHOT: {"eval": _eval(0.0, 0.0)}, exp_chain.CHAIN: {"eval": _eval(-0.1, -0.3)}}
    assert exp_chain.verdict({"arms": arms})["verdict"] == "reproduced"
    arms[exp_chain.CHAIN] = {"eval": _eval(0.2, -0.3)}  # better out of domain, worse on the other text
    assert exp_chain.verdict({"arms": arms})["verdict"] == "not reproduced"
    arms[exp_chain.CHAIN] = {"eval": _eval(0.0, 0.0)}
    assert exp_chain.verdict({"arms": arms})["verdict"] == "inconclusive"


def test_chain_verdict_names_the_start_or_the_tokens_as_the_cause():
    arms = {exp_chain.ONE_SHOT: {"eval": _eval(0.0, 0.0)}, exp_chain.CHAIN: {"eval": _eval(0.2, 0.2)},
            exp_chain.CHAIN_START: {"eval": _eval(-0.3, -0.3)}}
    result = exp_chain.verdict({"arms": arms})
    assert result["verdict"] == "not reproduced" and "spends" in result["why"]
    arms[exp_chain.CHAIN_START] = {"eval": _eval(0.3, 0.3)}
    assert "does not catch up" in exp_chain.verdict({"arms": arms})["why"]


def test_chain_widths_are_two_thirds_and_one_third_of_the_teachers_mlp():
    from transformers import LlamaConfig

    assert exp_chain.widths(LlamaConfig(intermediate_size=1536)) == (1024, 512)


def _search_arms(pruned: list[float], searched: list[float], after_kd: list[float]) -> dict:
    names = ["a", "b", "c", "d"]
    candidates = [{"name": n, "shape": {}, "params": 1e6, "score_before": p, "score_after": q}
                  for n, p, q in zip(names, pruned, searched)]
    arms = {"search (lora)": {"candidates": candidates}}
    arms.update({f"{n} + KD": {"eval": _eval(o, o)} for n, o in zip(names, after_kd)})
    return {"arms": arms}


def _heads_arms(kd_offsets: dict | None = None) -> dict:
    """Prune-only heads arms: every score beats every random choice, the merge level with it; after KD, each arm at
    `kd_offsets` (default: as before KD)."""
    arms = {n: {"eval": _eval(0.0, 0.0)} for s in exp_heads.SCORES for n in (s, f"{s} + merge")}
    arms.update({f"random {seed}": {"eval": _eval(0.5, 0.5)} for seed in exp_heads.RANDOM_SEEDS})
    if kd_offsets is not None:
        arms.update({n + exp_heads.KD: {"eval": _eval(*kd_offsets.get(n, (0.3, 0.3)))} for n in list(arms)})
    return {"arms": arms}


def test_heads_verdict_is_reproduced_when_the_paper_score_beats_random_and_the_merge_never_hurts():
    assert exp_heads.verdict(_heads_arms())["verdict"] == "reproduced"
    assert exp_heads.verdict(_heads_arms({n: (0.0, 0.0) for s in exp_heads.SCORES
                                          for n in (s, f"{s} + merge")}))["verdict"] == "reproduced"


def test_heads_verdict_counts_a_merge_that_hurts_only_after_kd():
    result = exp_heads.verdict(_heads_arms({"input": (0.0, 0.0), "input + merge": (0.2, 0.2)}))
    assert result["verdict"] == "not reproduced" and "after equal KD (input" in result["why"]


def test_heads_verdict_without_kd_arms_says_retraining_was_not_measured():
    arms = _heads_arms()
    arms["arms"]["input + merge"] = {"eval": _eval(0.4, 0.4)}
    result = exp_heads.verdict(arms)
    assert result["verdict"] == "not reproduced" and "not measured here yet" in result["why"]


def test_search_verdict_asks_that_retraining_ranks_better_than_pruning():
    rec = _search_arms([4, 3, 2, 1], [1, 2, 3, 4], [0.0, 0.3, 0.6, 0.9])  # the search's order is the long KD's
    assert exp_search.verdict(rec)["verdict"] == "reproduced"
    rec = _search_arms([1, 2, 3, 4], [1, 2, 3, 4], [0.0, 0.3, 0.6, 0.9])  # pruning alone ranked them as well
    result = exp_search.verdict(rec)
    assert result["verdict"] == "not reproduced" and "retraining was not needed" in result["why"]
    rec = _search_arms([4, 3, 2, 1], [1, 2, 3, 4], [0.6, 0.0, 0.3, 0.9])  # the search's winner is beaten after KD
    assert exp_search.verdict(rec)["verdict"] == "not reproduced"


def test_one_experiment_runs_resumes_and_renders(tmp_path, smollm2_tokenizer, capsys, one_thread):
    from helpers import teacher_folder
    from run import main

    teacher = teacher_folder(tmp_path / "teacher", smollm2_tokenizer)
    args = ["--teacher", str(teacher), "--quick", "--kd-tokens", "2048", "--eval-windows", "3", "--eval-len", "32",
            "--out", str(tmp_path / "out"), "--only", "heads"]
    assert main(args) == 0
    rec = json.loads((tmp_path / "out" / "results.json").read_text())["experiments"]["heads"]
    assert rec["verdict"] in ("reproduced", "not reproduced", "inconclusive") and rec["why"]
    assert (tmp_path / "out" / "heads.png").is_file() and "Not run yet" in (tmp_path / "out" / "README.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # resumed: every arm read back
    assert capsys.readouterr().out.count("done before") == len(rec["arms"])


def test_the_reverse_split_renders_beside_the_default(tmp_path, smollm2_tokenizer, one_thread):
    from helpers import teacher_folder
    from run import main

    teacher = teacher_folder(tmp_path / "teacher", smollm2_tokenizer)
    args = ["--teacher", str(teacher), "--quick", "--kd-tokens", "2048", "--eval-windows", "3", "--eval-len", "32",
            "--out", str(tmp_path / "out"), "--only", "heads"]
    assert main(args) == 0 and main([*args, "--train-on", "pydoc"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["experiments"]
    assert results["heads@pydoc"]["settings"]["train_on"] == "pydoc" and "train_on" not in results["heads"]["settings"]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "### Reverse split: trained on tiny-shakespeare + pydoc-topics" in readme
    assert (tmp_path / "out" / "heads-reverse.png").is_file()


@pytest.mark.slow  # every experiment on a tiny teacher: about 2 minutes on 2 cores
def test_the_suite_runs_every_experiment_resumes_and_renders(tmp_path, smollm2_tokenizer, capsys, one_thread):
    from helpers import teacher_folder
    from run import EXPERIMENTS, main

    teacher = teacher_folder(tmp_path / "teacher", smollm2_tokenizer)
    args = ["--teacher", str(teacher), "--quick", "--kd-tokens", "2048", "--eval-windows", "3", "--eval-len", "32",
            "--hellaswag", "4", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["experiments"]
    assert set(results) == set(EXPERIMENTS)
    for rec in results.values():
        assert rec["verdict"] in ("reproduced", "not reproduced", "inconclusive") and rec["why"]
        models = [a for a in rec["arms"].values() if "candidates" not in a]  # a search arm is not one model
        assert rec["machine"]["commit"] and all(len(a["eval"]["wikitext2"]["nll"]) == 3 for a in models)
        assert all(a["hellaswag"]["n"] == 4 and 0 <= a["hellaswag"]["acc_norm"] <= 1 for a in models)
    search = results["search_ranking"]["arms"]
    names = [c["name"] for c in search["search (lora)"]["candidates"]]
    assert len(names) >= 2 and names == [c["name"] for c in search["search (full)"]["candidates"]]
    assert all(f"{n} + KD" in search for n in names)
    kd = results["kd_vs_ce"]["arms"]
    assert kd["pruned + KD"]["tokens"] == kd["pruned + CE"]["tokens"] == kd["random init + KD"]["tokens"]
    readme = (tmp_path / "out" / "README.md").read_text()
    for name, module in EXPERIMENTS.items():
        assert module.TITLE in readme and (tmp_path / "out" / f"{name}.png").is_file()
    capsys.readouterr()
    assert main([*args, "--only", "heads"]) == 0  # resumed: every arm read back
    out = capsys.readouterr().out
    assert out.count("done before") == len(results["heads"]["arms"])


def test_an_unknown_experiment_is_refused(capsys):
    from run import main

    with pytest.raises(SystemExit):
        main(["--only", "nope"])
    assert "unknown experiment 'nope'" in capsys.readouterr().err
