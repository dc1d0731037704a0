"""Sequence-level unlikelihood: which tokens are negatives, the loss's value, the greedy continuation."""

from __future__ import annotations

import math

import torch

from hf_minitron.on_policy import is_on_policy_step
from hf_minitron.unlikelihood import greedy_continuations, repeat_mask, unlikelihood_loss, unlikelihood_sum
from test_distill import tiny_llama


def test_the_repeated_ngrams_later_occurrence_is_negative_and_its_first_is_not():
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4]])
    assert repeat_mask(ids, 4)[0].tolist() == [False] * 5 + [True] * 4


def test_text_without_a_repeated_ngram_has_no_negatives():
    ids = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2, 5]])  # bigrams repeat, no 4-gram does
    assert not repeat_mask(ids, 4).any()


def test_each_row_is_checked_on_its_own():
    ids = torch.tensor([[9, 9, 9, 9, 9, 9, 9, 9], [5, 6, 7, 8, 9, 9, 9, 9]])
    mask = repeat_mask(ids, 4)
    assert not mask[0, 0] and mask[0, 1:].all()  # every 9 after the first is part of a repeat of (9, 9, 9, 9)
    assert not mask[1].any()  # row 1 holds (9, 9, 9, 9) once: row 0's repeats do not count in row 1


def test_unlikelihood_sum_is_minus_log_one_minus_p_of_each_target():
    head = torch.nn.Linear(3, 4, bias=False)
    hidden, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    p = head(hidden).softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(unlikelihood_sum(hidden, targets, head), -torch.log(1 - p).sum(), rtol=1e-5)


def test_a_certain_token_costs_a_bounded_loss():
    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1000.0], [-1000.0]]))
    loss = unlikelihood_sum(torch.ones(1, 1), torch.tensor([0]), head)
    assert math.isfinite(loss.item()) and abs(loss.item() - (-math.log(1e-5))) < 1e-3


def test_the_greedy_continuation_runs_exactly_the_asked_tokens_and_is_greedy():
    model = tiny_llama(96)
    prompt = torch.randint(0, 96, (2, 5))
    a = greedy_continuations(model, prompt, 12, pad_token_id=0)
    b = greedy_continuations(model, prompt, 12, pad_token_id=0)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt) and torch.equal(a, b)


def test_the_loss_is_zero_with_a_gradient_when_nothing_repeats_and_positive_when_something_does():
    model = tiny_llama(96)
    prompt = torch.randint(0, 96, (2, 5))
    loss, share = unlikelihood_loss(model, model, prompt, 24, pad_token_id=0)
    negatives = repeat_mask(greedy_continuations(model, prompt, 24, 0)[:, 5:])
    assert share == negatives.float().mean().item()
    assert (loss.item() > 0) == bool(negatives.any()) and loss.requires_grad


def test_unlikelihood_steps_are_drawn_apart_from_on_policy_steps():
    ul = [is_on_policy_step(0.5, 3, step, stream=1) for step in range(64)]
    assert ul != [is_on_policy_step(0.5, 3, step) for step in range(64)]
    assert abs(sum(is_on_policy_step(0.3, 7, step, stream=1) for step in range(2000)) / 2000 - 0.3) < 0.04
