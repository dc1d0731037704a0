"""Pruning on every supported family: identity checks, every axis, save -> reload -> same logits."""

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron.archs import count_parameters
from hf_minitron.importance import ImportanceConfig, compute_importance
from hf_minitron.prune import PruneConfig, PruneTarget, parameter_count, plan_pruning, prune_model, save_student

IDS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))


def _scores(model):
    return compute_importance(model, IDS, ImportanceConfig(batch_size=2, depth_ppl_samples=4), progress=False)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_identity_prune_gives_teacher_logits(arch_name):
    teacher = tiny_model(arch_name)
    student, plan = prune_model(teacher, _scores(teacher), PruneTarget())
    assert plan.layers == list(range(teacher.config.num_hidden_layers))
    torch.testing.assert_close(_logits(student), _logits(teacher), rtol=1e-5, atol=1e-5)


def test_dropping_zero_layers_is_identity(arch_name):
    teacher = tiny_model(arch_name)
    student, _ = prune_model(teacher, _scores(teacher), PruneTarget(drop_layers=[]))
    torch.testing.assert_close(_logits(student), _logits(teacher), rtol=1e-5, atol=1e-5)


def test_prune_every_axis_save_reload(arch_name, tmp_path):
    teacher = tiny_model(arch_name)
    cfg = teacher.config
    kv = cfg.num_key_value_heads
    target = PruneTarget(hidden_size=48, ffn_size=64, num_heads=2 if kv < cfg.num_attention_heads else 2,
                         num_kv_heads=1 if kv < cfg.num_attention_heads else None, num_layers=3)
    student, plan = prune_model(teacher, _scores(teacher), target)
    s = student.config
    assert (s.hidden_size, s.num_attention_heads, s.num_hidden_layers, s.head_dim) == (48, 2, 3, 16)
    assert student.num_parameters() == count_parameters(s) == parameter_count(cfg, target)
    if getattr(cfg, "layer_types", None):
        assert s.layer_types == [cfg.layer_types[i] for i in plan.layers]
    save_student(student, tmp_path / "student")
    assert not list((tmp_path / "student").glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert type(reloaded) is type(teacher)
    torch.testing.assert_close(_logits(reloaded), _logits(student), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(_logits(reloaded)).all()


def test_tied_embeddings_stay_tied(tmp_path):
    teacher = tiny_model("llama_tied")
    student, _ = prune_model(teacher, _scores(teacher), PruneTarget(hidden_size=32))
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    save_student(student, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_width_pruning_keeps_top_units_and_same_heads_per_group():
    teacher = tiny_model("qwen3")
    scores = _scores(teacher)
    plan = plan_pruning(teacher.config, scores, PruneTarget(num_heads=2, ffn_size=10, hidden_size=20))
    neurons = scores.neurons()
    for i, t in enumerate(plan.layers):
        assert set(plan.ffn[i].tolist()) == set(torch.topk(neurons[t], 10).indices.tolist())
        # 2 KV groups of 2 query heads: one head kept in each group
        assert sorted(h // 2 for h in plan.heads[i].tolist()) == [0, 1]
    assert set(plan.hidden.tolist()) == set(torch.topk(scores.channels(), 20).indices.tolist())


def test_head_merging_changes_only_kept_query_heads():
    teacher = tiny_model("llama")
    scores = _scores(teacher)
    target = PruneTarget(num_heads=2)
    merged, plan = prune_model(teacher, scores, target, PruneConfig(merge_heads=True))
    plain, _ = prune_model(teacher, scores, target)  # the merge is off by default (issue 10: it hurts before KD)
    q_m = merged.model.layers[0].self_attn.q_proj.weight
    (k, p), = plan.head_merges[0][:1]
    pos = plan.heads[0].tolist().index(k)
    t_q = teacher.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q_m[pos * 16:(pos + 1) * 16], 2 * t_q[k * 16:(k + 1) * 16] - t_q[p * 16:(p + 1) * 16])
    torch.testing.assert_close(merged.model.layers[0].self_attn.k_proj.weight,
                               plain.model.layers[0].self_attn.k_proj.weight)


@pytest.mark.parametrize("target, message", [
    (PruneTarget(hidden_size=65), "hidden size 65"),
    (PruneTarget(ffn_size=0), "ffn size 0"),
    (PruneTarget(num_heads=3), "number of heads 3 is not divisible"),
    (PruneTarget(num_heads=4, num_kv_heads=1), "4 query heads per group"),
    (PruneTarget(num_layers=9), "number of layers 9"),
    (PruneTarget(drop_layers=[7]), "out of range"),
    (PruneTarget(hidden_size=50), "hidden size 50 is not a multiple of the 4 attention heads"),
])
def test_impossible_targets_fail_clearly(target, message):
    teacher = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        plan_pruning(teacher.config, _scores(teacher), target)


def test_depth_metrics_pick_layers():
    teacher = tiny_model("mistral")
    scores = _scores(teacher)
    for metric in ("ppl", "bi", "bi-run"):
        plan = plan_pruning(teacher.config, scores, PruneTarget(num_layers=2), PruneConfig(depth_metric=metric))
        assert len(plan.layers) == 2
    run_plan = plan_pruning(teacher.config, scores, PruneTarget(num_layers=2), PruneConfig(depth_metric="bi-run"))
    dropped = sorted(set(range(4)) - set(run_plan.layers))
    assert dropped[1] - dropped[0] == 1
    assert dropped[0] == int(scores.block_importance(2).argmin())


def test_ppl_run_drops_the_run_with_the_smallest_perplexity_increase():
    teacher = tiny_model("mistral")
    scores = compute_importance(teacher, IDS, ImportanceConfig(batch_size=2, depth_ppl_samples=4,
                                                               depth_ppl_runs=[1, 2]), progress=False)
    plan = plan_pruning(teacher.config, scores, PruneTarget(num_layers=2), PruneConfig(depth_metric="ppl-run"))
    start = int(scores.perplexity_increase(2).argmin())
    assert plan.layers == [i for i in range(4) if i not in (start, start + 1)]


def test_ppl_run_without_that_run_length_names_the_flag():
    teacher = tiny_model("mistral")
    scores = _scores(teacher)  # perplexity-drop runs of 1 layer only
    with pytest.raises(ValueError, match=r"ppl-run drops a run of 3 layers.*runs \[1\].*--depth-ppl-runs 3") as err:
        plan_pruning(teacher.config, scores, PruneTarget(num_layers=1), PruneConfig(depth_metric="ppl-run"))
    assert "\n" not in str(err.value)


def test_llama_depth_recipe_drops_the_reports_block():
    """The Llama-3.1-Minitron-4B-Depth recipe names the block the report dropped (the second half), not a metric."""
    from pathlib import Path

    from hf_minitron.prune import _select_layers
    from hf_minitron.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "llama-3.1-minitron-4b-depth.yaml")
    (member,) = recipe.members
    assert member.shape.drop_layers == list(range(16, 32)) and member.shape.num_layers is None
    assert _select_layers(None, 32, member.shape, recipe.prune.depth_metric) == list(range(16))
