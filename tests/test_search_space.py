"""The search space: per-axis value lists, every combination within tolerance, a spread when capped (configs only)."""

import itertools

import pytest
from transformers import LlamaConfig

from hf_minitron.prune import PruneTarget, parameter_count
from hf_minitron.search import SearchConfig as SearchSection
from hf_minitron.search_space import Candidate, axis_values, candidates_for, enumerate_candidates, mlp_size, spread

LLAMA_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, num_hidden_layers=32, vocab_size=128256, tie_word_embeddings=False)
BUDGET = 4_500_000_000


def test_default_axes_come_from_the_base_model():
    axes = axis_values(LLAMA_8B, SearchSection())
    assert axes["hidden_size"] == list(range(2048, 4097, 64))
    assert axes["num_heads"] == [16, 24, 32]  # whole multiples of the 8 KV heads, from half the base's
    assert axes["ffn_size"] == list(range(7168, 14337, 64))
    assert axis_values(LLAMA_8B, SearchSection(mlp_ratios=[3.0, 2.0]))["mlp_ratio"] == [2.0, 3.0]  # instead of sizes
    assert axes["num_layers"] == [32]  # widths only unless asked
    assert axis_values(LLAMA_8B, SearchSection(depth=True))["num_layers"] == list(range(16, 33))
    with pytest.raises(ValueError, match=r"search.num_heads: \[12\] not possible .* multiples of the 8 KV heads"):
        axis_values(LLAMA_8B, SearchSection(num_heads=[12, 16]))
    with pytest.raises(ValueError, match="search.num_layers: set depth: true"):
        SearchSection(num_layers=[24]).check()
    with pytest.raises(ValueError, match="search.mlp_ratios: give MLP sizes or factors, not both"):
        SearchSection(ffn_sizes=[8192], mlp_ratios=[2.0]).check()


def test_every_combination_of_the_axis_lists_within_tolerance_is_a_candidate():
    """No axis is solved to hit the budget: the candidates are exactly the grid points within +-5%."""
    search = SearchSection(hidden_sizes=[3072, 3584, 4096], num_heads=[16, 24, 32], mlp_ratios=[2.0, 2.5, 3.0, 3.5],
                           depth=True, num_layers=[28, 32], max_candidates=1000)
    found = enumerate_candidates(LLAMA_8B, BUDGET, search)
    expected = set()
    for hidden, heads, ratio, layers in itertools.product([3072, 3584, 4096], [16, 24, 32], [2.0, 2.5, 3.0, 3.5],
                                                          [28, 32]):
        if hidden % heads:  # LlamaConfig refuses it
            continue
        shape = (hidden, mlp_size(ratio, hidden, 14336, 64), heads, 8, layers)
        if abs(parameter_count(LLAMA_8B, PruneTarget(*shape)) / BUDGET - 1) <= 0.05:
            expected.add(shape)
    assert {tuple(c.shape[k] for k in ("hidden_size", "ffn_size", "num_heads", "num_kv_heads", "num_layers"))
            for c in found} == expected and len(expected) > 5
    assert all(c.params == parameter_count(LLAMA_8B, c.target()) for c in found)  # counted exactly
    assert len({c.shape["num_layers"] for c in found}) == 2 and len({c.shape["num_heads"] for c in found}) == 3


def test_the_cap_keeps_a_spread_of_shapes_not_the_closest_rounding():
    search = SearchSection(max_candidates=4)
    feasible = enumerate_candidates(LLAMA_8B, BUDGET, search)
    kept = candidates_for(LLAMA_8B, BUDGET, search)
    assert len(feasible) > 10 and len(kept) == 4
    for c in kept:
        s = c.shape
        assert abs(c.params / BUDGET - 1) <= 0.05 and c.params == parameter_count(LLAMA_8B, c.target())
        assert s["num_heads"] % 8 == 0 and s["num_kv_heads"] == 8 and s["num_layers"] == 32
        assert s["hidden_size"] % 64 == 0 and s["ffn_size"] % 64 == 0
    hidden = {c.shape["hidden_size"] for c in kept}
    assert {min(c.shape["hidden_size"] for c in feasible), 4096} <= hidden  # both ends of the hidden axis
    assert len({c.shape["num_heads"] for c in kept}) > 1 and len(hidden) == 4
    assert kept == candidates_for(LLAMA_8B, BUDGET, search)  # deterministic


def test_no_candidate_is_a_clear_error():
    with pytest.raises(ValueError, match="no shape within 5% of 100 parameters"):
        candidates_for(LLAMA_8B, 100, SearchSection())


def test_the_spread_starts_from_the_shape_keeping_the_most_heads_among_equally_wide_and_near():
    heads_or_mlp = [Candidate({"hidden_size": 576, "ffn_size": f, "num_heads": h, "num_kv_heads": 3, "num_layers": 30},
                              71_477_568) for f, h in ((576, 3), (448, 6), (320, 9))]
    heads_or_mlp.append(Candidate({"hidden_size": 576, "ffn_size": 256, "num_heads": 9, "num_kv_heads": 3,
                                   "num_layers": 30}, 68_159_808))
    kept = spread(heads_or_mlp, 2, 70_000_000)
    assert kept[0].shape["num_heads"] == 9 and kept[0].shape["ffn_size"] == 320
