"""Supervised fine-tuning for instruct variants on TRL's `SFTTrainer`, loss on the answers only.

Conversational (`messages`) and prompt/completion datasets are accepted, plus the Alpaca seed-task format (converted
to conversations). The model's own chat template is kept unless another is given; LoRA adapters (peft) are merged
into the weights before saving, so the output loads with `from_pretrained` and never needs the pre-LoRA base.
"""

from __future__ import annotations

import json
import os

import torch
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers

RESULT_FILE = "sft_result.json"


def alpaca_to_conversations(rows) -> list[dict]:
    """Alpaca seed tasks -> one conversation per (task, instance): user = instruction (+ input), assistant = output."""
    convs = []
    for row in rows:
        for inst in row["instances"]:
            user = row["instruction"].strip()
            if inst.get("input", "").strip():
                user += "\n\n" + inst["input"].strip()
            convs.append({"messages": [{"role": "user", "content": user},
                                       {"role": "assistant", "content": inst["output"].strip()}]})
    return convs


def last_turn_as_completion(example: dict) -> dict:
    """A conversation -> conversational prompt/completion (the final assistant turn is the completion).

    Used when the chat template has no `{% generation %}` markers: TRL then masks the prompt itself, which works
    with any template.
    """
    msgs = example["messages"]
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError(f"conversation does not end with an assistant turn: {[m['role'] for m in msgs]}")
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def load_sft_dataset(data, split: str = "train"):
    """A `datasets.Dataset` with `messages` or `prompt`+`completion` columns from a file, Hub id or dataset."""
    import datasets

    if isinstance(data, str):
        ext = os.path.splitext(data)[1]
        if os.path.exists(data) and ext in (".jsonl", ".json"):
            if ext == ".jsonl":
                with open(data) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
            else:
                with open(data) as f:
                    rows = json.load(f)
            if rows and "instances" in rows[0] and "instruction" in rows[0]:
                rows = alpaca_to_conversations(rows)
            data = datasets.Dataset.from_list(rows)
        elif os.path.exists(data):
            builder = {".parquet": "parquet", ".csv": "csv"}.get(ext)
            if builder is None:
                raise ValueError(f"SFT data file {data!r} must be .jsonl, .json, .parquet or .csv")
            data = datasets.load_dataset(builder, data_files=data, split="train")
        else:
            data = datasets.load_dataset(data, split=split)
    cols = set(data.column_names or [])
    if "messages" not in cols and not {"prompt", "completion"} <= cols:
        raise ValueError(f"SFT dataset needs a 'messages' column or 'prompt' and 'completion' columns; "
                         f"columns: {', '.join(sorted(cols))}")
    return data


def _read_template(chat_template: str) -> str:
    if os.path.isfile(chat_template):
        with open(chat_template) as f:
            return f.read()
    if os.path.isdir(chat_template):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(chat_template).chat_template
    return chat_template  # the template text itself


def sft(model, data, out: str, *, tokenizer=None, chat_template: str | None = None, lora: bool = False,
        lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, lora_target: str = "all-linear",
        config: SFTConfig | None = None, dtype: str | None = None, split: str = "train", resume: bool = False,
        overwrite: bool = False, **overrides) -> dict:
    """Fine-tune `model` (spec or loaded model) on chat data; save the full (LoRA-merged) model to `out`.

    The loss covers only the assistant answers. `chat_template` (a .jinja file, a tokenizer folder or the template
    text) replaces the tokenizer's own. Keyword `overrides` set `SFTConfig` fields.
    """
    if resume and os.path.isfile(os.path.join(out, RESULT_FILE)):
        with open(os.path.join(out, RESULT_FILE)) as f:
            return json.load(f)
    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    finished = os.path.isdir(out) and os.path.isfile(os.path.join(out, "config.json"))
    if not resume and not overwrite and (finished or last):
        raise FileExistsError(f"output folder {out!r} already holds a model or checkpoints; pass resume=True "
                              f"(--resume) to continue or overwrite=True (--overwrite) to start again")
    if isinstance(model, str):
        from .models import load_model, load_tokenizer, resolve_source

        src = resolve_source(model)
        spec, model = model, load_model(src, dtype=dtype)
        tokenizer = tokenizer or load_tokenizer(src)
    else:
        spec = model.name_or_path
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer= when giving a loaded model")
    if chat_template:
        tokenizer.chat_template = _read_template(chat_template)
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {spec!r} has no chat template; pass chat_template= (a .jinja file, "
                         f"a tokenizer folder or the template text)")

    dataset = load_sft_dataset(data, split)
    assistant_masks = "messages" in dataset.column_names and has_generation_markers(tokenizer.chat_template)
    if "messages" in dataset.column_names and not assistant_masks:
        dataset = dataset.map(last_turn_as_completion, remove_columns=dataset.column_names)
    defaults = {"output_dir": out, "assistant_only_loss": assistant_masks,
                "completion_only_loss": None if assistant_masks else True,
                "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}
    if config is None:
        config = SFTConfig(**{**defaults, **overrides})
    else:
        for key, value in {**defaults, **overrides}.items():
            setattr(config, key, value)

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 target_modules=lora_target, task_type="CAUSAL_LM")
    model.train()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    train_out = trainer.train(resume_from_checkpoint=last if resume and last else None)
    if lora:  # adapters folded in: the output never depends on a base model
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(out)
    result = {"out": out, "model": spec, "steps": trainer.state.global_step, "train_loss": train_out.training_loss,
              "lora": {"r": lora_r, "alpha": lora_alpha, "target": lora_target} if lora else None,
              "loss_on": "assistant turns" if assistant_masks else "completions", "examples": len(dataset),
              "log_history": trainer.state.log_history}
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=1)
    return result
