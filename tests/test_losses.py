"""The sparse forward KL against a cached teacher (top-K + one tail bucket)."""

from __future__ import annotations

import pytest
import torch

from hf_minitron.losses import chunked_sparse_losses, logit_divergence, sparse_forward_kl


def _cached(z_t: torch.Tensor, k: int, temperature: float):
    """What the cache stores for teacher logits z_t: top-K ids and log-probs, log of the rest."""
    z = z_t / temperature
    log_z = z.logsumexp(-1, keepdim=True)
    top, ids = z.topk(k, dim=-1)
    tail = z.scatter(-1, ids, float("-inf")).logsumexp(-1) - log_z[:, 0]
    return ids, top - log_z, tail


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_with_k_equal_vocab_is_the_full_forward_kl_and_its_gradient(temperature):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(7, 50, requires_grad=True), torch.randn(7, 50) * 3
    ids, logp, tail = _cached(z_t, 50, temperature)
    assert torch.isinf(tail).all()
    sparse = sparse_forward_kl(z_s, ids, logp, tail, temperature)
    full = logit_divergence(z_s, z_t, "forward_kl", temperature)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-5)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), z_s)
    (g_full,) = torch.autograd.grad(full.sum(), z_s)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(g_sparse, g_full, rtol=1e-5, atol=1e-6)


def test_sparse_kl_ignores_padding_entries_of_no_mass():
    torch.manual_seed(2)
    z_s, z_t = torch.randn(5, 40, requires_grad=True), torch.randn(5, 40) * 2
    ids, logp, tail = _cached(z_t, 3, 1.0)
    padded_ids = torch.cat([ids, ids[:, :1].expand(5, 2)], -1)  # a top-P batch: the first id again, log-prob -inf
    padded_logp = torch.cat([logp, torch.full((5, 2), float("-inf"))], -1)
    plain, padded = sparse_forward_kl(z_s, ids, logp, tail), sparse_forward_kl(z_s, padded_ids, padded_logp, tail)
    torch.testing.assert_close(padded, plain)
    grads = [torch.autograd.grad(x.sum(), z_s)[0] for x in (plain, padded)]
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("k", [1, 4, 16])
def test_sparse_kl_with_small_k_is_finite_non_negative_and_at_most_the_full_kl(k):
    torch.manual_seed(1)
    z_s, z_t = torch.randn(9, 64, requires_grad=True), torch.randn(9, 64) * 2
    ids, logp, tail = _cached(z_t, k, 1.0)
    sparse = sparse_forward_kl(z_s, ids, logp.half(), tail.half())  # as stored: float16
    full = logit_divergence(z_s, z_t, "forward_kl")
    assert torch.isfinite(sparse).all() and (sparse >= -1e-3).all()
    assert (sparse <= full + 1e-3).all()  # merging outcomes never raises a KL
    (grad,) = torch.autograd.grad(sparse.sum(), z_s)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_sparse_kl_is_zero_when_the_student_is_the_teacher():
    torch.manual_seed(2)
    z = torch.randn(5, 32)
    ids, logp, tail = _cached(z, 8, 1.0)
    torch.testing.assert_close(sparse_forward_kl(z, ids, logp, tail), torch.zeros(5), atol=1e-5, rtol=0)


def test_chunked_sparse_losses_match_unchunked_and_cut_the_student_to_the_teacher_vocab():
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 40, bias=False)  # the student has 8 padded logits beyond the teacher's 32
    h, labels = torch.randn(21, 16), torch.randint(0, 32, (21,))
    ids, logp, tail = _cached(torch.randn(21, 32), 6, 1.0)
    whole = chunked_sparse_losses(h, ids, logp, tail, labels, head, vocab=32, chunk_tokens=0)
    chunked = chunked_sparse_losses(h, ids, logp, tail, labels, head, vocab=32, chunk_tokens=5)
    torch.testing.assert_close(chunked, whole)
    cut = sparse_forward_kl(head(h)[:, :32], ids, logp, tail).sum()
    torch.testing.assert_close(whole[0], cut)


def _bucketed_kl_reference(z_s, ids, logp, tail):
    """The folded forward KL with the student's tail from a log-sum-exp over its non-top-K logits (the slow, exact
    way the fast path must agree with)."""
    log_q = z_s.log_softmax(-1)
    q_top = log_q.gather(-1, ids)
    q_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return (logp.exp() * (logp - q_top)).sum(-1) + tail.exp() * (tail - q_tail)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # a spread student, and one whose tail float32 cannot resolve
def test_sparse_kl_matches_the_exact_tail_and_its_gradient(scale):
    torch.manual_seed(0)
    z_t, z_s = torch.randn(6, 64), (torch.randn(6, 64) * scale).requires_grad_()
    logp, ids = z_t.log_softmax(-1).topk(8, -1)
    tail = torch.log1p(-logp.exp().sum(-1))
    fast, exact = sparse_forward_kl(z_s, ids, logp, tail), _bucketed_kl_reference(z_s, ids, logp, tail)
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-5)
    (g_fast,) = torch.autograd.grad(fast.sum(), z_s)
    (g_exact,) = torch.autograd.grad(_bucketed_kl_reference(z_s, ids, logp, tail).sum(), z_s)
    torch.testing.assert_close(g_fast, g_exact, rtol=1e-4, atol=1e-5)
