"""On-policy windows for distillation: the student continues a window's first tokens itself and is taught on its
own text (the lambda of GKD, Agarwal et al., arXiv 2306.13649).

An off-policy student only ever sees the corpus as context; greedy decoding feeds it its own output, where a small
error (repeating a phrase) makes the next one likelier: the repetition loops of a briefly distilled member. Scoring
the teacher on the student's own samples trains exactly those contexts (whether it helps is measured in
bench/RESULTS.md: on the quickstart's 70m it did not). Which steps go on-policy is drawn from the
seed and the step, so every process of a run (and a resumed run) draws the same.
"""

from __future__ import annotations

import random

import torch
from transformers import GenerationConfig


def is_on_policy_step(fraction: float, seed: int, step: int, stream: int = 0) -> bool:
    """Whether optimizer step `step` trains on the student's samples: a fixed draw per (seed, step). `stream` 1
    draws the unlikelihood steps, independently of the on-policy ones."""
    if fraction <= 0:
        return False
    key = seed * 1_000_003 + step if stream == 0 else f"{stream}:{seed}:{step}"
    return random.Random(key).random() < fraction


@torch.no_grad()
def student_windows(model, input_ids: torch.Tensor, prompt_tokens: int, pad_token_id: int | None) -> dict:
    """Each row's first `prompt_tokens` tokens continued by `model` (sampled at temperature 1, the policy itself)
    to the row's length; labels score the sampled tokens only. The returned dict replaces the batch's inputs."""
    prompt = input_ids[:, :prompt_tokens]
    new = input_ids.shape[1] - prompt.shape[1]
    # a fresh config: the member's generation_config (a repetition penalty, a top_p) must not shape its policy;
    # min_new_tokens = max_new_tokens keeps every window (and every process's generate loop) the same length
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else model.config.eos_token_id
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                           min_new_tokens=new, eos_token_id=eos, use_cache=True,
                           pad_token_id=pad_token_id if pad_token_id is not None else eos)
    training = model.training
    model.eval()  # gradient checkpointing (active in training mode) would turn the KV cache off
    try:
        ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
    finally:
        model.train(training)
    labels = ids.clone()
    labels[:, :prompt.shape[1]] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
