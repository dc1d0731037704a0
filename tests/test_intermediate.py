"""Intermediate-state distillation: the automatic pair policy, the shared projection, the MLP-input and attention
sites."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model
from test_distill import first_batch, make_trainer, save_pair, tiny_llama, tiny_tokenizer, write_corpus


def test_auto_maps_blocks_proportionally_only_below_three_quarters_of_the_layers():
    from hf_minitron.intermediate import auto_layer_map

    assert auto_layer_map(32, 16) == [(0, 0)] + [(2 * s, s) for s in range(1, 16)]
    assert auto_layer_map(32, 23)[:3] == [(0, 0), (1, 1), (3, 2)]  # round(s * 32/23), half up
    assert auto_layer_map(32, 24) == []  # 3/4 of the layers kept: logits only (paper best practice 7)


def test_auto_matches_each_kept_block_with_the_block_it_was_copied_from():
    from hf_minitron.intermediate import auto_layer_map

    # teacher blocks 0, 1, 4, 7 kept: student state s (block s-1's output) pairs with teacher state kept[s-1] + 1
    assert auto_layer_map(8, 4, kept=[0, 1, 4, 7]) == [(0, 0), (1, 1), (2, 2), (5, 3)]
    assert auto_layer_map(8, 6, kept=[0, 1, 2, 3, 4, 5]) == []  # 3/4 kept: logits only, whatever was kept


def test_kept_layers_are_used_only_against_the_model_the_student_was_pruned_from():
    from hf_minitron.intermediate import kept_layers_for

    record = {"kept_layers": [0, 2, 3], "teacher_parameters": 1000}
    assert kept_layers_for(record, 4, 1000, 3) == [0, 2, 3]
    assert kept_layers_for(record, 4, 999, 3) is None  # another teacher (e.g. the grand-parent of a chain)
    assert kept_layers_for(record, 3, 1000, 3) is None and kept_layers_for(None, 4, 1000, 3) is None


def test_distilling_a_depth_pruned_student_pairs_its_blocks_with_their_originals(tmp_path, one_thread):
    from hf_minitron.distill import RESULT_FILE, distill
    from hf_minitron.importance import compute_importance
    from hf_minitron.prune import PruneConfig, PruneTarget, run_prune

    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), layers=4, seed=0)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    scores = compute_importance(teacher, torch.randint(0, len(tok), (4, 16)), progress=False)
    run_prune(teacher, tok, scores, PruneTarget(drop_layers=[1, 3]), PruneConfig(), tmp_path / "student")
    out = tmp_path / "run"
    distill(str(tmp_path / "teacher"), str(tmp_path / "student"), write_corpus(tmp_path), str(out),
            max_tokens=2 * 32, max_length=32, per_device_train_batch_size=2, report_to=[])
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["is_pairs"] == ["0:0", "1:1"] and "copied from" in result["is_policy"]  # proportional: 2:1


def test_auto_policy_turns_on_and_says_so(tmp_path, capsys):
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), layers=4), tiny_llama(len(tok), hidden=32, inter=64, layers=2, seed=1)
    trainer = make_trainer(teacher, student, tmp_path)  # is_layers left at its default
    assert [str(p) for p in trainer.state_pairs] == ["0:0", "2:1"]
    assert "is_layers auto" in capsys.readouterr().out
    same_depth = make_trainer(tiny_llama(len(tok), layers=2), tiny_llama(len(tok), layers=2, seed=1), tmp_path)
    assert same_depth.state_pairs == [] and not hasattr(same_depth.model, "minitron_is_projections")


def test_one_projection_with_bias_is_shared_by_every_pair(tmp_path):
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), layers=3), tiny_llama(len(tok), hidden=32, inter=64, seed=1)
    shared = make_trainer(teacher, student, tmp_path, is_layers="0:0,1:1,3:2").model.minitron_is_projections
    assert len(shared) == 1 and shared[0].bias is not None and tuple(shared[0].weight.shape) == (64, 32)
    per_pair = make_trainer(teacher, tiny_llama(len(tok), hidden=32, inter=64, seed=1), tmp_path,
                            is_layers="0:0,1:1,3:2", is_projection="per_pair").model.minitron_is_projections
    assert len(per_pair) == 3


def test_cosine_state_loss_is_the_default_and_ignores_scale(tmp_path):
    from hf_minitron.distill import DistillConfig
    from hf_minitron.losses import state_loss

    h = torch.randn(5, 16)
    assert state_loss(3 * h, h).abs().max() < 1e-6  # 1 - cos: outlier-dominated magnitudes do not matter
    assert state_loss(3 * h, h, "mse").min() > 1
    assert DistillConfig(output_dir=str(tmp_path)).is_loss == "cosine"


def test_mlp_input_site_reads_the_residual_stream_entering_the_mlp(arch_name):
    """The hooked tensor x is what the MLP branch adds to: block output = x + [post-norm](mlp(norm(x)))."""
    from hf_minitron.archs import get_arch
    from hf_minitron.intermediate import StateReader

    model = tiny_model(arch_name)
    spec = get_arch(model.config)
    reader = StateReader(model, [("mlp_input", 2), ("block", 2)])
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), reader.capturing():
        out = model(ids, output_hidden_states=True)
    x, block = reader.states(out.hidden_states)
    layer = spec.decoder_layers(model)[1]
    with torch.no_grad():
        branch = spec.mlp_module(layer)(spec.mlp_input(layer)(x))
        post = getattr(layer, "post_feedforward_layernorm", None)  # Gemma normalises the branch before adding it
        branch = post(branch) if post is not None else branch
    assert torch.allclose(x + branch, block, atol=1e-5)
    reader.remove()


def test_mlp_input_loss_trains_only_what_precedes_the_mlp(tmp_path):
    """L_i at block 1 alone (pair 1:1, mlp_input site): gradients reach the embedding and block 1's attention, not
    its MLP; with gradient checkpointing, so the hooked tensor stays in the graph."""
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), layers=2), tiny_llama(len(tok), layers=2, seed=1)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="1:1", is_sites=["mlp_input"], alpha=1.0,
                           w_logit=0.0, gradient_checkpointing=True)
    assert [str(p) for p in trainer.state_pairs] == ["1:1@mlp_input"]
    trainer.model.train()
    trainer.compute_loss(trainer.model, first_batch(trainer)).backward()
    layer = trainer.model.model.layers[0]
    assert trainer.model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layer.mlp.parameters())
    assert trainer._metrics["train"]["kd_is"][-1] > 0


def test_both_sites_vanish_for_a_copy_of_the_teacher(tmp_path):
    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), layers=2)
    trainer = make_trainer(teacher, copy.deepcopy(teacher), tmp_path, is_layers="0:0,2:2",
                           is_sites=["block", "mlp_input", "attention"])
    # no MLP input nor attention at index 0
    assert [str(p) for p in trainer.state_pairs] == ["0:0", "2:2", "2:2@mlp_input", "2:2@attention"]
    trainer.compute_loss(trainer.model, first_batch(trainer))
    assert trainer._metrics["train"]["kd_is"][-1] < 1e-6


def test_bad_site_and_pairs_refused(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="out of range"):
        make_trainer(tiny_llama(len(tok)), tiny_llama(len(tok), seed=1), tmp_path, is_layers="3:1")
    from hf_minitron.distill import DistillConfig

    with pytest.raises(ValueError):
        DistillConfig(output_dir=str(tmp_path), is_sites=["attn"])


def test_distill_records_the_chosen_pairs(tmp_path, one_thread):
    from hf_minitron.distill import RESULT_FILE, distill

    teacher, student = save_pair(tmp_path)  # 3 teacher layers, 2 student layers: below 3/4, auto turns L_is on
    out = tmp_path / "run"
    distill(teacher, student, write_corpus(tmp_path), str(out), max_tokens=2 * 32, max_length=32,
            per_device_train_batch_size=2, report_to=[])
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["is_pairs"] == ["0:0", "2:1"] and "is_layers auto" in result["is_policy"]
    assert result["losses"]["is_layers"] == "auto"


# ---- attention relations (L_att) ---------------------------------------------------------------------------
def _qkv(model, ids, layer: int = 2):
    from hf_minitron.intermediate import StateReader

    reader = StateReader(model, [("attention", layer)])
    with torch.no_grad(), reader.capturing():
        out = model(ids, output_hidden_states=True)
    (qkv,) = reader.states(out.hidden_states)
    reader.remove()
    return qkv


def test_relation_loss_is_zero_against_itself_and_positive_against_a_perturbed_copy(arch_name):
    """Every family: GQA (4 query / 2 KV heads: K and V half as wide as Q) and Phi-3's fused qkv_proj included."""
    from hf_minitron.intermediate import attention_relation_loss, qkv_widths

    model = tiny_model(arch_name)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    qkv = _qkv(model, ids)
    assert [x.shape[-1] for x in qkv] == list(qkv_widths(model.config))  # 64/32/32 (Nemotron: MHA, 64/64/64)
    rows = torch.ones(2, 10, dtype=torch.bool)
    assert attention_relation_loss([qkv], [qkv], rows, heads=8).abs() < 1e-5
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert attention_relation_loss([_qkv(other, ids)], [qkv], rows, heads=8) > 1e-4


def test_relations_are_causal():
    """Changing the last token changes only the last relation row of Q-Q, K-K and V-V."""
    from hf_minitron.intermediate import relation_log_probs

    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 128
    for x, y in zip(_qkv(model, ids), _qkv(model, changed), strict=True):
        a, b = relation_log_probs(x, 8), relation_log_probs(y, 8)
        assert torch.allclose(a[:, :, :-1], b[:, :, :-1], atol=1e-6)
        assert not torch.allclose(a[:, :, -1], b[:, :, -1], atol=1e-4)
        assert torch.isinf(a[:, :, 0, 1:]).all()  # the first token relates only to itself


def test_attention_site_distill_step_reports_kd_is(tmp_path):
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), layers=4), tiny_llama(len(tok), hidden=32, inter=64, layers=2, seed=1)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="0:0,4:2", is_sites=["block", "attention"])
    assert [str(p) for p in trainer.state_pairs] == ["0:0", "4:2", "4:2@attention"]
    assert len(trainer.model.minitron_is_projections) == 1  # the attention pair has no projection
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    loss.backward()
    metrics = trainer._metrics["train"]
    assert torch.isfinite(loss) and metrics["kd_is"][-1] > 0 and metrics["kd_att"][-1] > 0


def test_attention_loss_trains_only_the_layers_q_k_v_and_what_precedes_them(tmp_path):
    """L_att at student block 1 alone: gradients reach its K projection, not its MLP nor block 2; with gradient
    checkpointing, so the hooked q/k/v stay in the graph."""
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), layers=4), tiny_llama(len(tok), hidden=32, inter=64, layers=2, seed=1)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="2:1", is_sites=["attention"], w_logit=0.0,
                           alpha=1.0, gradient_checkpointing=True)
    assert not hasattr(trainer.model, "minitron_is_projections")
    trainer.model.train()
    trainer.compute_loss(trainer.model, first_batch(trainer)).backward()
    first, second = trainer.model.model.layers
    k_grad = first.self_attn.k_proj.weight.grad
    assert k_grad.abs().sum() > 0 and torch.isfinite(k_grad).all()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in [*first.mlp.parameters(), *second.parameters()])


def test_relation_heads_must_divide_the_widths(tmp_path):
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok)), tiny_llama(len(tok), hidden=32, inter=64, seed=1)
    with pytest.raises(ValueError) as err:
        make_trainer(teacher, student, tmp_path, is_layers="2:2", is_sites=["attention"], att_relation_heads=3)
    assert str(err.value) == ("att_relation_heads=3 must divide every query/key/value width (teacher q/k/v 64/32/32; "
                              "student q/k/v 32/16/16)")
