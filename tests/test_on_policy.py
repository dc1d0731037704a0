"""On-policy windows: which steps are drawn, and what a student-continued window holds."""

from __future__ import annotations

import torch

from hf_minitron.on_policy import is_on_policy_step, student_windows
from test_distill import tiny_llama


def test_no_step_is_on_policy_at_fraction_zero_and_every_step_at_one():
    assert not any(is_on_policy_step(0.0, 42, step) for step in range(200))
    assert all(is_on_policy_step(1.0, 42, step) for step in range(200))


def test_the_share_of_on_policy_steps_follows_the_fraction():
    share = sum(is_on_policy_step(0.3, 7, step) for step in range(2000)) / 2000
    assert abs(share - 0.3) < 0.04


def test_the_draw_depends_on_seed_and_step_only():
    first = [is_on_policy_step(0.5, 3, step) for step in range(64)]
    assert first == [is_on_policy_step(0.5, 3, step) for step in range(64)]
    assert first != [is_on_policy_step(0.5, 4, step) for step in range(64)]


def test_student_windows_keep_the_prompt_and_score_only_the_sampled_tokens():
    model = tiny_llama(96)
    model.train()
    ids = torch.randint(0, 96, (3, 20))
    torch.manual_seed(0)
    out = student_windows(model, ids, prompt_tokens=5, pad_token_id=0)
    assert out["input_ids"].shape == ids.shape and torch.equal(out["input_ids"][:, :5], ids[:, :5])
    assert (out["labels"][:, :5] == -100).all() and torch.equal(out["labels"][:, 5:], out["input_ids"][:, 5:])
    assert not torch.equal(out["input_ids"][:, 5:], ids[:, 5:])  # the student's tokens, not the corpus's
    assert model.training  # back in training mode after generating


def test_student_windows_sample_from_the_student_not_greedily():
    model = tiny_llama(96)
    ids = torch.randint(0, 96, (1, 12)).repeat(8, 1)
    torch.manual_seed(0)
    out = student_windows(model, ids, prompt_tokens=4, pad_token_id=0)["input_ids"][:, 4:]
    assert len({tuple(row.tolist()) for row in out}) > 1  # equal prompts, different samples
