"""Head scores: output-side norms and the ablation pass against direct computation; prune ranks by the chosen one."""

import pytest
import torch
from conftest import tiny_model

from hf_minitron.heads import ablation_scores, head_ablation, output_norms, zero_head
from hf_minitron.importance import ImportanceConfig, compute_importance
from hf_minitron.prune import PruneConfig, PruneTarget, plan_pruning

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))


def test_output_norms_equal_each_heads_projected_contribution():
    o_proj = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(2, 5, 32)
    direct = torch.stack([(x[..., h * 8:(h + 1) * 8] @ o_proj.weight[:, h * 8:(h + 1) * 8].T).norm(dim=-1)
                          for h in range(4)], dim=-1)
    torch.testing.assert_close(output_norms(x, o_proj, 8), direct, rtol=1e-4, atol=1e-5)


def test_zero_head_equals_zeroing_its_output_projection_columns():
    model = tiny_model("llama")
    reference = tiny_model("llama")
    with torch.no_grad():
        reference.model.layers[1].self_attn.o_proj.weight[:, 16:32] = 0
        with zero_head(model, 1, 1):
            torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_ablation_scores_a_dead_head_zero():
    model = tiny_model("qwen2")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, :16] = 0  # head 0 of layer 0 contributes nothing
    scores = ablation_scores(head_ablation(model, [IDS], progress=False))
    assert scores.shape == (4, 4)
    assert abs(float(scores[0, 0])) < 1e-6 * scores.abs().max()
    assert float(scores.abs().sum()) > 0


def test_output_score_sees_a_projection_the_input_score_cannot():
    model = tiny_model("llama")
    with torch.no_grad():  # head 0's output is as large as ever, but o_proj almost discards it
        model.model.layers[0].self_attn.o_proj.weight[:, :16] *= 1e-3
    scores = compute_importance(model, IDS, ImportanceConfig(depth_ppl_samples=0), progress=False)
    assert int(scores.heads(score="output")[0, :2].argmin()) == 0
    plan = plan_pruning(model.config, scores, PruneTarget(num_heads=2), PruneConfig(head_score="output"))
    assert 0 not in plan.heads[0].tolist()


def test_compute_importance_records_the_ablation_pass_when_asked():
    model = tiny_model("mistral")
    config = ImportanceConfig(batch_size=2, depth_ppl_samples=0, head_ablation_samples=3)
    scores = compute_importance(model, IDS, config, progress=False)
    direct = ablation_scores(head_ablation(model, [IDS[:3]], progress=False))
    torch.testing.assert_close(scores.heads(score="ablation"), direct, rtol=1e-2, atol=1e-3)  # batches of 2+1 vs 3


def test_missing_ablation_scores_fail_with_the_flag_to_set():
    model = tiny_model("llama")
    scores = compute_importance(model, IDS, ImportanceConfig(depth_ppl_samples=0), progress=False)
    with pytest.raises(ValueError, match="--head-ablation-samples"):
        plan_pruning(model.config, scores, PruneTarget(num_heads=2), PruneConfig(head_score="ablation"))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_ablation_resumed_from_cached_inputs_equals_whole_forwards(arch):
    model = tiny_model(arch)
    fast = head_ablation(model, [IDS], progress=False)["head_ablation_nll"]
    with torch.no_grad():
        for i, h in ((0, 1), (2, 3), (3, 0)):
            with zero_head(model, i, h):
                logits = model(input_ids=IDS).logits[:, :-1]
            direct = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), IDS[:, 1:].reshape(-1), reduction="sum")
            torch.testing.assert_close(fast[i, h].float(), direct, rtol=1e-5, atol=1e-4)
