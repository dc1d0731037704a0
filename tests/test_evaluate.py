"""Evaluation: perplexity variants agree with direct computations; the local multiple-choice task through lm-eval
gives the same numbers as a direct log-likelihood computation; results JSON and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_minitron.evaluate import (EvalError, EvaluateConfig, LocalChoiceTask, check_local_task, evaluate_model,
                                   parse_tasks, perplexity, primary_metric, run_lm_eval, sliding_perplexity)


def tiny_vocab_model(vocab: int = 49152, seed: int = 0):
    """A tiny random Llama with the SmolLM2 vocabulary, so the real tokenizer can drive it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def small_model():
    return tiny_vocab_model()


@torch.no_grad()
def _direct_token_nll(model, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    """Per-token reference: token t is predicted from the tokens of the window that first scores it."""
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        for t in range(max(prev_end, begin + 1), end):
            logits = model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1]
            nll -= torch.log_softmax(logits.float(), -1)[ids[t]].item()
            n += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / n)


def test_sliding_perplexity_matches_direct_and_windows(small_model):
    ids = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(1))
    for stride in (4, 8, 16):
        assert sliding_perplexity(small_model, ids, 16, stride) == pytest.approx(
            _direct_token_nll(small_model, ids, 16, stride), rel=1e-4)
    windows = ids[:32].view(2, 16)
    expected = perplexity(small_model, windows)
    assert sliding_perplexity(small_model, ids[:32], 16, 16) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(EvalError, match="stride 17"):
        sliding_perplexity(small_model, ids, 16, 17)


def test_parse_tasks():
    assert parse_tasks("paper")["mmlu"] == 5 and parse_tasks("paper")["arc_challenge"] == 25
    assert parse_tasks("mmlu:3,hellaswag") == {"mmlu": 3, "hellaswag": 10}
    assert parse_tasks("code") == {"humaneval": 0, "mbpp": 3}
    with pytest.raises(EvalError, match="mmlu:x"):
        parse_tasks("mmlu:x")


def test_local_task_errors(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        check_local_task(LocalChoiceTask(str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "a", "choices": ["b"], "label": 0}) + "\n")
    with pytest.raises(EvalError, match="no column 'endings'"):
        check_local_task(LocalChoiceTask(str(bad)))
    assert LocalChoiceTask(str(bad)).task_name == "local_bad"


@torch.no_grad()
def _direct_choice_scores(model, tokenizer, rows):
    """acc / acc_norm by hand: sum log p(' ' + ending | ctx), tokens split where lm-eval splits them."""
    acc = acc_norm = 0
    for row in rows:
        ctx_ids = tokenizer.encode(row["ctx"])
        lls = []
        for ending in row["endings"]:
            whole = tokenizer.encode(row["ctx"] + " " + ending)
            cont = whole[len(ctx_ids):]
            logits = model(input_ids=torch.tensor([whole])).logits[0, -len(cont) - 1:-1].float()
            lls.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item())
        norm = [ll / len(e) for ll, e in zip(lls, row["endings"])]
        acc += int(max(range(len(lls)), key=lls.__getitem__) == row["label"])
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == row["label"])
    return acc / len(rows), acc_norm / len(rows)


def test_local_hellaswag_through_lm_eval_matches_direct(small_model, smollm2_tokenizer, shared_data, tmp_path):
    rows = [json.loads(line) for line in (shared_data / "hellaswag_val_dev.jsonl").open()][:12]
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = LocalChoiceTask(str(path), name="hs_tiny")
    out = run_lm_eval(small_model, smollm2_tokenizer, local_tasks=[task], limit=10, batch_size=4)
    metrics = out["hs_tiny"]["metrics"]
    acc, acc_norm = _direct_choice_scores(small_model, smollm2_tokenizer, rows[:10])
    assert (acc, acc_norm) != (0.0, 0.0)
    assert metrics["acc"] == pytest.approx(acc) and metrics["acc_norm"] == pytest.approx(acc_norm)
    assert out["hs_tiny"]["num_fewshot"] == 0 and out["hs_tiny"]["samples"] == 10
    assert primary_metric(out["hs_tiny"]) == ("acc_norm", metrics["acc_norm"])


def test_unknown_task_is_one_line(small_model, smollm2_tokenizer):
    with pytest.raises(EvalError, match="unknown lm-eval task.*'no_such_task'"):
        run_lm_eval(small_model, smollm2_tokenizer, {"no_such_task": 0})


def test_evaluate_model_and_cli(tmp_path, smollm2_tokenizer, shared_data):
    model = tiny_vocab_model()
    folder = tmp_path / "member"
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    config = EvaluateConfig(seq_len=32, windows=2)
    result = evaluate_model(model, smollm2_tokenizer, "m", config, str(shared_data / "wikitext2_test.txt"))
    ppl = result["perplexity"][0]
    assert ppl["tokens"] == 64 and ppl["perplexity"] > 1000  # random weights: near-uniform over 49K tokens
    assert result["parameters"] == sum(p.numel() for p in model.parameters())

    from hf_minitron.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(folder), "--data", str(shared_data / "wikitext2_test.txt"), "--seq-len", "32",
                 "--windows", "2", "--choice-files", str(shared_data / "hellaswag_val_dev.jsonl"), "--limit", "4",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["perplexity"][0]["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-4)
    assert set(saved["tasks"]["local_hellaswag_val_dev"]["metrics"]) >= {"acc", "acc_norm"}


@pytest.mark.slow
def test_real_teacher_hellaswag_reference(smollm2_path, smollm2_tokenizer, shared_data):
    """The shared data README's reference: SmolLM2-135M-Instruct, first 300 tasks, 0-shot: acc 0.377, acc_norm 0.44."""
    from hf_minitron.models import load_model

    model = load_model(str(smollm2_path), dtype="float32")
    task = LocalChoiceTask(str(shared_data / "hellaswag_val_dev.jsonl"))
    out = run_lm_eval(model, smollm2_tokenizer, local_tasks=[task],
                      limit=300, batch_size=8)
    metrics = out["local_hellaswag_val_dev"]["metrics"]
    assert metrics["acc"] == pytest.approx(0.377, abs=0.01) and metrics["acc_norm"] == pytest.approx(0.44, abs=0.01)


def test_a_greedy_loop_is_a_4_gram_seen_three_times():
    from hf_minitron.evaluate import repeated_ngram

    assert repeated_ngram([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]) == (1, 2, 3, 4)
    assert repeated_ngram([1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 8]) is None  # twice is not a loop
    assert repeated_ngram(list(range(40))) is None


def test_evaluation_records_each_prompts_greedy_continuation(small_model, smollm2_tokenizer):
    config = EvaluateConfig(greedy_prompts=["The history of"])
    greedy = evaluate_model(small_model, smollm2_tokenizer, "m", config)["greedy"]
    assert [g["prompt"] for g in greedy] == ["The history of"] and greedy[0]["continuation"]
    assert "greedy" not in evaluate_model(small_model, smollm2_tokenizer, "m", EvaluateConfig(greedy_prompts=[]))
