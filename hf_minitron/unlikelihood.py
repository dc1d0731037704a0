"""Sequence-level unlikelihood against greedy repetition loops (Welleck et al., arXiv 1908.04319, section 5.2).

A briefly distilled small member decodes greedily into loops ("The city is a way to make sense.\\n\\nThe city is a
way to make sense.") that neither more tokens, on-policy KD nor broader text removed (bench/RESULTS.md): the
teacher itself, shown a looping context, predicts the loop's next token (in-context copying), so KD on the looping
text endorses it. Unlikelihood trains the contexts greedy decoding reaches directly: the student continues a
window's first tokens greedily, every token that is part of an n-gram repeated within that continuation is a
negative, and the loss is -log(1 - p(token | context)) summed over those tokens. The corpus's own windows still get
the KD loss on the same step, so the student learns where not to repeat without leaving the teacher.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

UNLIKELIHOOD_NGRAM = 4  # the n of the loops penalised: the same as evaluate.greedy_loops' check


@torch.no_grad()
def greedy_continuations(model, prompt: torch.Tensor, new_tokens: int, pad_token_id: int | None) -> torch.Tensor:
    """`prompt` [B, P] continued greedily by `model` for exactly `new_tokens` tokens: [B, P + new_tokens].

    A fresh generation config, so the member's own (a repetition penalty) cannot hide the loops this trains away;
    min_new_tokens = max_new_tokens keeps every row, and every process's generate loop, the same length.
    """
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else model.config.eos_token_id
    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=eos,
                           use_cache=True, pad_token_id=pad_token_id if pad_token_id is not None else eos)
    training = model.training
    model.eval()  # gradient checkpointing (active in training mode) would turn the KV cache off
    try:
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
    finally:
        model.train(training)


def repeat_mask(ids: torch.Tensor, n: int = 4) -> torch.Tensor:
    """[B, L] bool: the tokens of every n-gram of each row that already occurred earlier in that row (each token of
    the second and later occurrences), the negatives of sequence-level unlikelihood."""
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for row, seq in enumerate(ids.tolist()):
        seen: set[tuple[int, ...]] = set()
        for i in range(len(seq) - n + 1):
            gram = tuple(seq[i:i + n])
            if gram in seen:
                mask[row, i:i + n] = True
            seen.add(gram)
    return mask


def unlikelihood_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                     transform=None, vocab: int | None = None) -> torch.Tensor:
    """sum over N positions of -log(1 - p(target)), from the final hidden states [N, H] through the LM `head` (and
    the family's logit `transform`, Gemma's soft cap). 1 - p is clamped at 1e-5, as Welleck et al. do, so a token
    the model is sure of costs at most ~11.5 instead of infinity."""
    logits = head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    if vocab is not None:
        logits = logits[:, :vocab]
    p = logits.softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return -torch.log((1 - p).clamp(min=1e-5)).sum()


def unlikelihood_loss(model, unwrapped, prompt_ids: torch.Tensor, new_tokens: int, pad_token_id: int | None,
                      transform=None, vocab: int | None = None) -> tuple[torch.Tensor, float]:
    """(mean over the greedy continuation's tokens of -log(1 - p) at its repeated n-grams' tokens, the share of
    tokens that repeat). `model` is the trained (maybe wrapped) student, `unwrapped` the same model unwrapped (it
    generates and lends its LM head). The forward always runs, even with no repeat, so every process of a sharded
    run does the same collectives."""
    ids = greedy_continuations(unwrapped, prompt_ids, new_tokens, pad_token_id)
    start = prompt_ids.shape[1]
    new = ids[:, start:]
    negatives = repeat_mask(new, UNLIKELIHOOD_NGRAM)
    none = torch.empty(0, dtype=torch.long, device=ids.device)
    h = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, output_hidden_states=True,
              logits_to_keep=none).hidden_states[-1][:, start - 1:-1]  # the states predicting each new token
    total = unlikelihood_sum(h[negatives], new[negatives], unwrapped.get_output_embeddings(), transform, vocab)
    return total / negatives.numel(), negatives.float().mean().item()
