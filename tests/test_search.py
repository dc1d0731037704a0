"""Architecture search: Kendall tau and settling; the ranking curve, early stop, resume and the winner's adapter of a
search on a tiny teacher."""

import json

import pytest
import torch
from test_distill import text_dataset, tiny_llama, tiny_tokenizer

import hf_minitron.search as search_module
from hf_minitron.archs import count_parameters
from hf_minitron.importance import compute_importance
from hf_minitron.prune import PruneTarget, prune_model
from hf_minitron.search import SearchConfig as SearchSection
from hf_minitron.search import kendall_tau, merge_adapter, rankings, run_search, settled, settled_at
from hf_minitron.search_space import Candidate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kendall_tau_rankings_and_settling():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3) and kendall_tau([5], [7]) == 1.0
    a, b = Candidate({}, 1, score_before=9.0), Candidate({}, 1, score_before=8.0)
    for step, (pa, pb) in enumerate([(5.0, 6.0), (4.0, 5.0), (3.0, 4.5)], 1):
        a.curve.append({"step": step, "tokens": 10 * step, "perplexity": pa})
        b.curve.append({"step": step, "tokens": 10 * step, "perplexity": pb})
    rows = rankings([a, b])
    assert [r["order"] for r in rows] == [[1, 0], [0, 1], [0, 1], [0, 1]]
    assert [r["kendall_tau"] for r in rows] == [None, -1.0, 1.0, 1.0]
    assert settled(rows, 2) and not settled(rows, 3) and not settled(rows[:3], 2) and not settled(rows, 0)
    assert settled_at(rows) == 1 and settled_at(rows[:2]) is None  # the flip from the pruned ranking is not held


def _search_setup():
    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=2, inter=128, seed=1).eval()
    torch.manual_seed(0)
    scores = compute_importance(teacher, torch.randint(0, len(tok), (4, 32)), progress=False)
    ids = tok("\n".join(text_dataset(4)["text"]))["input_ids"]
    return tok, teacher, scores, torch.tensor(ids[:64]).view(2, 32)


def test_search_ranks_at_intervals_and_binds_the_adapter_to_its_base(tmp_path):
    tok, teacher, scores, windows = _search_setup()
    budget = int(count_parameters(teacher.config) * 0.8)
    search = SearchSection(tolerance=0.1, multiple=16, max_candidates=3, tokens=192, eval_every=64, stable_evals=0,
                           seq_len=32, batch_size=2, lr=1e-3, eval_windows=2, eval_seq_len=32, adapter="merge",
                           lora_r=4, lora_alpha=8)
    lines = []
    output = run_search(teacher, scores, teacher, tok, text_dataset(), windows, budget, search, tmp_path / "s",
                        progress=False, log=lines.append)
    result = json.loads((output.path / "search.json").read_text())
    assert output.record["winner"] == result["winner"]["shape"]
    cands = result["candidates"]
    assert len(cands) == 3 and sorted(c["rank"] for c in cands) == [1, 2, 3], cands
    assert all(c["score_before"] > 0 and c["tokens"] == 192 for c in cands)
    assert all([p["step"] for p in c["curve"]] == [1, 2, 3] and c["score_after"] == c["curve"][-1]["perplexity"]
               for c in cands)
    rows = result["rankings"]  # the pruned ranking, then one per interval, each with tau against the previous
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[0]["kendall_tau"] is None
    assert all(-1 <= r["kendall_tau"] <= 1 for r in rows[1:]) and result["tokens"] == 3 * 192
    assert rows[-1]["perplexity"] == [c["score_after"] for c in cands]
    winner = result["winner"]
    assert winner["rank"] == 1 and winner["score_after"] == min(c["score_after"] for c in cands)
    assert abs(winner["params"] / budget - 1) <= 0.1
    table = (tmp_path / "s" / "search.md").read_text()
    assert "| rank |" in table and "| step | tokens | c1 | c2 | c3 | ranking | Kendall tau |" in table
    assert result["settled"] in table and any("| 1 |" in line for line in lines)
    # the winner's adapter merges into the winner's pruned base, and only into it
    base, _ = prune_model(teacher, scores, PruneTarget(**winner["shape"]))
    merged = merge_adapter(base, tmp_path / "s" / "adapter")
    assert type(merged).__name__ == "LlamaForCausalLM" and count_parameters(merged.config) == winner["params"]
    other = next(c for c in cands if c["rank"] != 1)
    wrong, _ = prune_model(teacher, scores, PruneTarget(**other["shape"]))
    with pytest.raises(ValueError, match="trained on another base"):
        merge_adapter(wrong, tmp_path / "s" / "adapter")
    assert not list((tmp_path / "s").glob("candidate-*"))  # the candidates' checkpoints removed


def test_search_stops_once_the_ranking_holds(tmp_path):
    """One candidate: its ranking cannot change, so with stable_evals=1 the search stops after two intervals."""
    tok, teacher, scores, windows = _search_setup()
    budget = int(count_parameters(teacher.config) * 0.8)
    search = SearchSection(tolerance=0.1, multiple=16, max_candidates=1, tokens=256, eval_every=64, stable_evals=1,
                           seq_len=32, batch_size=2, eval_windows=2, eval_seq_len=32, lora_r=4, lora_alpha=8)
    output = run_search(teacher, scores, teacher, tok, text_dataset(), windows, budget, search, tmp_path / "s",
                        progress=False, log=lambda *_: None)
    result = json.loads((output.path / "search.json").read_text())
    assert [r["step"] for r in result["rankings"]] == [0, 1, 2] and result["tokens"] == 128
    assert result["settled"].startswith("Ranking settled at step 1") and "stopped early" in result["settled"]


def test_search_without_retraining_ranks_by_the_pruned_perplexity(tmp_path):
    tok, teacher, scores, windows = _search_setup()
    budget = int(count_parameters(teacher.config) * 0.8)
    search = SearchSection(tolerance=0.1, multiple=16, max_candidates=3, tokens=0, eval_windows=2, eval_seq_len=32,
                           adapter="merge")
    output = run_search(teacher, scores, teacher, tok, text_dataset(), windows, budget, search, tmp_path / "s",
                        progress=False, log=lambda *_: None)
    result = json.loads((output.path / "search.json").read_text())
    cands = result["candidates"]
    assert len(cands) == 3 and all(c["curve"] == [] and c["tokens"] == 0 for c in cands)
    assert all(c["score_after"] == c["score_before"] > 0 for c in cands) and result["tokens"] == 0
    assert result["winner"]["score_before"] == min(c["score_before"] for c in cands)
    assert [r["step"] for r in result["rankings"]] == [0] and result["settled"].startswith("No retraining")
    assert not (tmp_path / "s" / "adapter").exists()  # nothing trained, nothing to merge


def test_interrupted_search_resumes_where_it_stopped(tmp_path, monkeypatch):
    tok, teacher, scores, windows = _search_setup()
    budget = int(count_parameters(teacher.config) * 0.8)
    search = SearchSection(tolerance=0.1, multiple=16, max_candidates=2, tokens=128, eval_every=64, stable_evals=0,
                           seq_len=32, batch_size=2, lr=1e-3, eval_windows=2, eval_seq_len=32, adapter="merge",
                           mode="full")
    args = (teacher, scores, teacher, tok, text_dataset(), windows, budget, search)
    whole = run_search(*args, tmp_path / "whole", progress=False, log=lambda *_: None)
    calls, real = [], search_module.train_segment

    def flaky(*a, **kw):
        calls.append(a[7])  # the segment's last step
        if len(calls) == 3:  # the first candidate's second segment
            raise RuntimeError("power cut")
        return real(*a, **kw)

    monkeypatch.setattr(search_module, "train_segment", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        run_search(*args, tmp_path / "resumed", progress=False, log=lambda *_: None)
    calls.clear()
    resumed = run_search(*args, tmp_path / "resumed", progress=False, log=lambda *_: None)
    assert calls == [2, 2]  # only the second segment of each candidate was left
    assert [json.loads((o.path / "search.json").read_text())["candidates"] for o in (whole, resumed)] == [
        json.loads((whole.path / "search.json").read_text())["candidates"]] * 2
    assert resumed.sha256 == whole.sha256  # the same winner's weights, kept for the prune stage
    winner = json.loads((resumed.path / "search.json").read_text())["winner"]
    base, _ = prune_model(teacher, scores, PruneTarget(**winner["shape"]))
    retrained = merge_adapter(base, resumed.path / "adapter")  # mode full: the retrained weights replace the base's
    before, after = base.state_dict(), retrained.state_dict()
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)
