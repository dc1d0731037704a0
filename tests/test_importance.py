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
