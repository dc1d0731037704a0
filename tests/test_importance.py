"""Importance hooks against direct computation, the aggregation grid, depth metrics, save/load, two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from hf_minitron.importance import (AGGREGATIONS, ImportanceConfig, ImportanceScores, aggregate, compute_importance,
                                     skip_layers)

IDS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))


def _captured(model):
    """Per-sample inputs of o_proj and down_proj of layer 0, captured without our code."""
    seen = {}
    layer = model.model.layers[0]
    h1 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("o", a[0].clone()))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("down", a[0].clone()))
    with torch.no_grad():
        model(input_ids=IDS)
    h1.remove(), h2.remove()
    return seen


@pytest.mark.parametrize("batch_agg", AGGREGATIONS)
@pytest.mark.parametrize("seq_agg", AGGREGATIONS)
def test_width_scores_match_direct_computation(batch_agg, seq_agg):
    model = tiny_model("llama")
    scores = compute_importance(model, IDS, ImportanceConfig(batch_size=6, depth_ppl_samples=0), progress=False)
    seen = _captured(model)
    seq = {"mean": lambda a: a.mean(1), "l2": lambda a: a.norm(dim=1), "var": lambda a: a.var(1, unbiased=False)}
    batch = {"mean": lambda a: a.mean(0), "l2": lambda a: a.norm(dim=0), "var": lambda a: a.var(0, unbiased=False)}
    heads = seen["o"].view(6, 16, 4, 16).norm(dim=-1)
    neurons = seen["down"].abs()
    torch.testing.assert_close(scores.heads(batch_agg, seq_agg)[0].float(), batch[batch_agg](seq[seq_agg](heads)),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.neurons(batch_agg, seq_agg)[0].float(),
                               batch[batch_agg](seq[seq_agg](neurons)), rtol=1e-4, atol=1e-6)


def test_default_aggregation_is_batch_l2_seq_mean():
    model = tiny_model("qwen2")
    scores = compute_importance(model, IDS, ImportanceConfig(depth_ppl_samples=0), progress=False)
    torch.testing.assert_close(scores.neurons(), scores.neurons("l2", "mean"))
    assert scores.channels().shape == (64,)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(scores.tensors["heads"], 6, "max", "mean")


def test_scoring_builds_no_autograd_graph():
    model = tiny_model("llama")
    grad_on = []
    hook = model.model.layers[0].register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    compute_importance(model, IDS, ImportanceConfig(depth_ppl_samples=2), progress=False)
    hook.remove()
    assert grad_on and not any(grad_on)  # a graph per batch, chained by the running sums, cost 17 GB on SmolLM2


def test_block_importance_and_perplexity_drop():
    model = tiny_model("gemma2")
    scores = compute_importance(model, IDS, ImportanceConfig(batch_size=2, depth_ppl_samples=6, depth_ppl_runs=[1, 2]),
                                progress=False)
    # BI of layer 0 from hidden states captured by transformers itself
    with torch.no_grad():
        hs = model(input_ids=IDS, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hs[0], hs[1], dim=-1)
    torch.testing.assert_close(scores.block_importance(1)[0].float(), (1 - cos).mean(), rtol=1e-4, atol=1e-6)
    assert scores.block_importance(2).shape == (3,)
    # perplexity with layer 2 skipped, computed directly
    with torch.no_grad(), skip_layers(model, [2]):
        logits = model(input_ids=IDS).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), IDS[:, 1:].reshape(-1))
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(model(input_ids=IDS).logits[:, :-1].reshape(-1, 128),
                                                 IDS[:, 1:].reshape(-1))
    increase = scores.perplexity_increase(1)[2].item()
    assert increase == pytest.approx(nll.exp().item() - base.exp().item(), rel=1e-4)
    assert scores.perplexity_increase(2).shape == (3,)
    with pytest.raises(ValueError, match="run 3"):
        scores.perplexity_increase(3)


def _skipped_nll(model, ids, layers):
    """Summed NLL with `layers` made identities, by a whole forward (the reference computation)."""
    with torch.no_grad(), skip_layers(model, layers):
        logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="sum")


def test_cached_perplexity_drop_equals_skipping_layers(arch_name):
    """Resuming from cached layer inputs gives the NLL of a whole forward with the run skipped, every family
    (rotary, sliding-window masks, Gemma's logit soft-cap), for a partial last batch too."""
    model = tiny_model(arch_name)
    scores = compute_importance(model, IDS, ImportanceConfig(batch_size=2, depth_ppl_samples=5,
                                                             depth_ppl_runs=[1, 2, 4]), progress=False)
    ids = IDS[:5]
    base = _skipped_nll(model, ids, [])
    torch.testing.assert_close(scores.tensors["ppl_base_nll"].float(), base, rtol=1e-5, atol=1e-4)
    nll = scores.tensors["ppl_nll"]
    for r, run in enumerate([1, 2, 4]):
        for i in range(4 - run + 1):
            torch.testing.assert_close(nll[r, i].float(), _skipped_nll(model, ids, range(i, i + run)),
                                       rtol=1e-5, atol=1e-4)


def test_perplexity_pass_runs_only_the_layers_after_each_run():
    """Skipping layers i..i+run-1 re-runs layers i+run.. only: layer j runs once in the calibration pass, then once
    per (run, start) that ends before it; a whole forward per skip would run it far more often."""
    model = tiny_model("llama")
    calls = [0] * 4
    handles = [layer.self_attn.register_forward_pre_hook(lambda m, a, j=j: calls.__setitem__(j, calls[j] + 1))
               for j, layer in enumerate(model.model.layers)]
    compute_importance(model, IDS[:2], ImportanceConfig(batch_size=2, depth_ppl_samples=2, depth_ppl_runs=[1, 2]),
                       progress=False)
    for h in handles:
        h.remove()
    expected = [1 + sum(1 for run in (1, 2) for i in range(4 - run + 1) if i + run <= j) for j in range(4)]
    assert calls == expected == [1, 2, 4, 6]


@pytest.mark.parametrize("arch", ["llama", "phi3", "nemotron"])
def test_pre_activation_neuron_site_is_the_first_mlp_matrix_output(arch):
    """neuron_site=pre scores |X W1^T|: gate_proj's output (gated MLP), the gate half of Phi-3's fused gate_up_proj,
    up_proj's output for Nemotron's ungated MLP."""
    model = tiny_model(arch)
    mlp = model.model.layers[1].mlp
    module = {"llama": "gate_proj", "phi3": "gate_up_proj", "nemotron": "up_proj"}[arch]
    seen = {}
    handle = getattr(mlp, module).register_forward_hook(lambda m, a, out: seen.setdefault("w1", out.clone()))
    with torch.no_grad():
        model(input_ids=IDS)
    handle.remove()
    pre = seen["w1"][..., :96].abs()  # phi3: [gate; up] rows, gate first
    scores = compute_importance(model, IDS, ImportanceConfig(batch_size=3, depth_ppl_samples=0, neuron_site="pre"),
                                progress=False)
    torch.testing.assert_close(scores.neurons("l2", "mean")[1].float(), pre.mean(1).norm(dim=0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.neurons("mean", "l2")[1].float(), pre.norm(dim=1).mean(0), rtol=1e-4, atol=1e-6)
    post = compute_importance(model, IDS, ImportanceConfig(depth_ppl_samples=0), progress=False)
    assert not torch.allclose(post.neurons()[1], scores.neurons()[1])
    assert scores.meta["config"]["neuron_site"] == "pre"


def test_batch_size_does_not_change_scores():
    """Windows are full packed sequences (no padding): batching changes the scores by float rounding only."""
    model = tiny_model("qwen3")
    one, four = (compute_importance(model, IDS, ImportanceConfig(batch_size=bs, depth_ppl_samples=6), progress=False)
                 for bs in (1, 4))
    for key in one.tensors:
        torch.testing.assert_close(four.tensors[key], one.tensors[key], rtol=1e-5, atol=1e-8)


def test_scores_save_and_load(tmp_path):
    model = tiny_model("phi3")
    scores = compute_importance(model, IDS, ImportanceConfig(depth_ppl_samples=2), {"teacher": {"source": "x"}},
                                progress=False)
    scores.save(tmp_path)
    meta = json.loads((tmp_path / "importance.json").read_text())
    assert meta["samples"] == 6 and meta["seq_len"] == 16 and meta["aggregation"] == {"batch": "l2", "seq": "mean"}
    loaded = ImportanceScores.load(tmp_path)
    torch.testing.assert_close(loaded.heads(), scores.heads())
    with pytest.raises(FileNotFoundError, match="no importance scores"):
        ImportanceScores.load(tmp_path / "missing")


DIST_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from hf_minitron.importance import ImportanceConfig, compute_importance
from accelerate import PartialState
ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
scores = compute_importance(tiny_model("llama"), ids, ImportanceConfig(batch_size=1, depth_ppl_samples=3),
                            progress=False)
if PartialState().is_main_process:
    scores.save(sys.argv[1])
PartialState().destroy_process_group()  # before exit: a group left to the interpreter's teardown can abort a rank
"""


def test_two_processes_give_single_process_scores(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(DIST_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tmp_path / "two")]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    one, two = ImportanceScores.load(tmp_path / "one"), ImportanceScores.load(tmp_path / "two")
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    for key in one.tensors:
        torch.testing.assert_close(two.tensors[key], one.tensors[key], rtol=1e-6, atol=1e-9)
