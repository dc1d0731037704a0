"""SFT: alpaca seed tasks -> conversations, loss on answers only, saved (LoRA-merged) model reloads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distill import CHATML, DATA, tiny_llama, tiny_tokenizer  # noqa: E402

SEED_TASKS = DATA / "alpaca_seed_tasks.jsonl"
PLAIN_CHATML = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def small_seed_file(tmp_path: Path, n: int = 12) -> str:
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(SEED_TASKS.read_text().splitlines(keepends=True)[:n]))
    return str(path)


def test_alpaca_converter():
    from hf_minitron.data import alpaca_to_conversations

    rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines()]
    convs = alpaca_to_conversations(rows)
    assert len(convs) == sum(len(r["instances"]) for r in rows) >= 175
    with_input = next(r for r in rows if r["instances"][0]["input"].strip())
    conv = convs[sum(len(r["instances"]) for r in rows[:rows.index(with_input)])]["messages"]
    assert conv[0]["content"].startswith(with_input["instruction"].strip())
    assert conv[0]["content"].endswith(with_input["instances"][0]["input"].strip())
    assert conv[1] == {"role": "assistant", "content": with_input["instances"][0]["output"].strip()}


def test_missing_columns_refused():
    from datasets import Dataset

    from hf_minitron.data import load_sft_dataset

    with pytest.raises(ValueError, match="columns: question"):
        load_sft_dataset(Dataset.from_dict({"question": ["hi"]}))


def _trainable_text(trainer, tok, i: int = 0) -> tuple[str, str]:
    row = trainer.train_dataset[i]
    kept = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    return tok.decode(row["input_ids"]), tok.decode(kept)


@pytest.mark.parametrize("template", [CHATML, PLAIN_CHATML], ids=["assistant-masks", "prompt-completion"])
def test_loss_only_on_answers(tmp_path, template, monkeypatch):
    from trl import SFTTrainer

    from hf_minitron import sft as sft_mod

    tok = tiny_tokenizer()
    tok.chat_template = template
    seen = {}
    orig_train = SFTTrainer.train

    def capture(self, *a, **kw):
        seen["trainer"] = self
        return orig_train(self, *a, **kw)

    monkeypatch.setattr(SFTTrainer, "train", capture)
    out = str(tmp_path / "out")
    result = sft_mod.sft(tiny_llama(len(tok)), small_seed_file(tmp_path), out, tokenizer=tok, lora=False, max_steps=2,
                         per_device_train_batch_size=2, max_length=512, report_to=[], gradient_checkpointing=False,
                         save_strategy="no", learning_rate=1e-3)
    first = json.loads(SEED_TASKS.read_text().splitlines()[0])
    full, trained_on = _trainable_text(seen["trainer"], tok)
    answer = first["instances"][0]["output"].strip()
    assert answer in full and first["instruction"] in full
    assert trained_on.startswith(answer) and first["instruction"] not in trained_on
    ends = ("<|im_end|>", "<|im_end|>\n", "<|endoftext|>", "<|im_end|><|endoftext|>")
    assert trained_on.replace(answer, "").strip() in ends
    assert result["steps"] == 2 and result["loss_on"] == ("assistant turns" if template == CHATML else "completions")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.vocab_size == len(tok)
    assert AutoTokenizer.from_pretrained(out).chat_template == template
    with pytest.raises(FileExistsError):
        sft_mod.sft(reloaded, small_seed_file(tmp_path), out, tokenizer=tok)


def test_lora_merges_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_minitron.sft import sft

    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out = str(tmp_path / "lora")
    sft(base, small_seed_file(tmp_path), out, tokenizer=tok, lora=True, lora_r=4, max_steps=3,
        per_device_train_batch_size=2, max_length=512, report_to=[], gradient_checkpointing=False,
        save_strategy="no", learning_rate=5e-3)
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    after = reloaded.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touched only the adapted linears
