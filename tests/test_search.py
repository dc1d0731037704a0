"""Architecture search: candidate shapes near a budget from configs alone; LoRA-ranked search on a tiny teacher."""

import json

import pytest
import torch
from test_distill import text_dataset, tiny_llama, tiny_tokenizer
from transformers import LlamaConfig

from hf_minitron.archs import count_parameters
from hf_minitron.importance import compute_importance
from hf_minitron.prune import PruneTarget, parameter_count, prune_model
from hf_minitron.search import SearchConfig as SearchSection
from hf_minitron.search import candidates_for, enumerate_candidates, merge_adapter, run_search

LLAMA_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, num_hidden_layers=32, vocab_size=128256, tie_word_embeddings=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_candidates_respect_budget_divisibility_and_cap():
    budget = 4_500_000_000
    found = enumerate_candidates(LLAMA_8B, budget, tolerance=0.05, multiple=64, max_candidates=10)
    assert len(found) == 10
    distances = [abs(c.params - budget) for c in found]
    assert distances == sorted(distances)
    for c in found:
        s = c.shape
        assert abs(c.params / budget - 1) <= 0.05 and c.params == parameter_count(LLAMA_8B, c.target())
        assert s["num_heads"] % s["num_kv_heads"] == 0 and s["num_kv_heads"] == 8
        assert s["hidden_size"] % 64 == 0 and s["ffn_size"] % 64 == 0 and s["num_layers"] == 32  # widths only
    deep = enumerate_candidates(LLAMA_8B, budget, depth=True, max_candidates=200)
    assert any(c.shape["num_layers"] < 32 for c in deep)


def test_no_candidate_is_a_clear_error():
    with pytest.raises(ValueError, match="no shape within 5% of 100 parameters"):
        candidates_for(LLAMA_8B, 100, SearchSection())


def test_search_ranks_candidates_and_binds_the_adapter_to_its_base(tmp_path):
    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=2, inter=128, seed=1).eval()
    torch.manual_seed(0)
    scores = compute_importance(teacher, torch.randint(0, len(tok), (4, 32)), progress=False)
    budget = int(count_parameters(teacher.config) * 0.8)
    search = SearchSection(tolerance=0.1, multiple=16, max_candidates=3, tokens=128, seq_len=32, batch_size=2, lr=1e-3,
                           eval_windows=2, eval_seq_len=32, adapter="merge", lora_r=4, lora_alpha=8)
    ids = tok("\n".join(text_dataset(4)["text"]))["input_ids"]
    windows = torch.tensor(ids[:64]).view(2, 32)
    lines = []
    output = run_search(teacher, scores, teacher, tok, text_dataset(), windows, budget, search, tmp_path / "s",
                        progress=False, log=lines.append)
    result = json.loads((output.path / "search.json").read_text())
    assert output.record["winner"] == result["winner"]["shape"]
    cands = result["candidates"]
    assert len(cands) == 3 and sorted(c["rank"] for c in cands) == [1, 2, 3], cands
    assert all(c["score_before"] > 0 and c["score_after"] > 0 and c["tokens"] == 128 for c in cands)
    winner = result["winner"]
    assert winner["rank"] == 1 and winner["score_after"] == min(c["score_after"] for c in cands)
    assert abs(winner["params"] / budget - 1) <= 0.1
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["winner"] == winner and "| rank |" in (tmp_path / "s" / "search.md").read_text()
    assert any("| 1 |" in line for line in lines)  # the table was printed
    # the winner's adapter merges into the winner's pruned base, and only into it
    base, _ = prune_model(teacher, scores, PruneTarget(**winner["shape"]))
    merged = merge_adapter(base, tmp_path / "s" / "adapter")
    assert type(merged).__name__ == "LlamaForCausalLM" and count_parameters(merged.config) == winner["params"]
    other = next(c for c in cands if c["rank"] != 1)
    wrong, _ = prune_model(teacher, scores, PruneTarget(**other["shape"]))
    with pytest.raises(ValueError, match="trained on another base"):
        merge_adapter(wrong, tmp_path / "s" / "adapter")
    assert not list((tmp_path / "s").glob("candidate-*"))  # losers' adapters removed


def test_lora_retraining_does_not_depend_on_what_ran_before(tmp_path):
    """The adapters are initialised from the seed, so fresh processes (different RNG histories) agree."""
    from hf_minitron.search import lora_retrain

    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=2, inter=128, seed=1).eval()
    search = SearchSection(tokens=64, seq_len=32, batch_size=2, lora_r=4, lora_alpha=8)
    adapters = []
    for history in (1, 2):
        torch.manual_seed(history)
        torch.rand(100 * history)  # some other random work earlier in the process
        student = tiny_llama(len(tok), hidden=64, layers=2, inter=128, seed=1)
        model, _ = lora_retrain(student, teacher, tok, text_dataset(), search, tmp_path / str(history), seed=3,
                                progress=False)
        adapters.append({k: v.clone() for k, v in model.state_dict().items() if "lora_" in k})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
