"""Supervised fine-tuning for instruct variants on TRL's `SFTTrainer`, loss on the answers only.

Conversational (`messages`) and prompt/completion datasets are accepted, plus the Alpaca seed-task format (converted
to conversations by `data.load_sft_dataset`). The model's own chat template is kept unless another is given; LoRA
adapters (peft) are merged
into the weights before saving, so the output loads with `from_pretrained` and never needs the pre-LoRA base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers

from .checkpoints import SaveOnInterrupt, drop_checkpoints, last_complete_checkpoint
from .training import default_bf16, trainer_config
from .rundir import SFT_FILE

RESULT_FILE = SFT_FILE  # named in rundir.py, with every artefact of a run
EXCLUDED = ("output_dir", "trust_remote_code")  # the stage's --out; models load through ModelArgs


@dataclass
class InstructConfig(SFTConfig):
    """`SFTConfig` plus LoRA and chat-template settings; the recipe's `sft:` section and `hf-minitron sft`'s flags."""

    lora: bool = field(default=True, metadata={"help": "train LoRA adapters (peft), merged into the weights on save"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target: str = field(default="all-linear", metadata={"help": "modules given adapters (not lm_head)"})
    chat_template: str | None = field(default=None, metadata={
        "help": "chat template instead of the model's: a .jinja file, a tokenizer folder or the template text"})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "keep the checkpoint-* folders once the model is saved (default: delete them)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the data (max_steps overrides it)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "learning rate (~1e-4 with LoRA, ~2e-5 without)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass (less memory, slower)"})
    save_total_limit: int | None = field(default=2, metadata={
        "help": "checkpoints kept while training (the newest; none: all)"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast (default: on where bf16 is native: a bf16-capable GPU, or with no GPU a CPU "
                "with AVX512-BF16/AMX)"})

    def __post_init__(self):
        check_template_path(self.chat_template)
        default_bf16(self)
        super().__post_init__()


def check_template_path(chat_template: str | None) -> None:
    """A chat_template that names a file (ends in .jinja/.j2/.txt, or holds a path separator and no Jinja tag)
    must exist: a mistyped path would otherwise become the template's text."""
    if not chat_template or os.path.exists(chat_template) or "{%" in chat_template or "{{" in chat_template:
        return
    if chat_template.endswith((".jinja", ".j2", ".txt")) or os.sep in chat_template:
        raise ValueError(f"chat_template {chat_template!r}: no such file or folder")


def last_turn_as_completion(example: dict) -> dict:
    """A conversation -> conversational prompt/completion (the final assistant turn is the completion).

    Used when the chat template has no `{% generation %}` markers: TRL then masks the prompt itself, which works
    with any template.
    """
    msgs = example["messages"]
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError(f"conversation does not end with an assistant turn: {[m['role'] for m in msgs]}")
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def _read_template(chat_template: str) -> str:
    if os.path.isfile(chat_template):
        with open(chat_template) as f:
            return f.read()
    if os.path.isdir(chat_template):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(chat_template).chat_template
    return chat_template  # the template text itself


def sft(model, data, out: str, *, tokenizer=None, config: InstructConfig | None = None, dtype: str | None = None,
        resume: bool = False, overwrite: bool = False, **overrides) -> dict:
    """Fine-tune `model` (spec or loaded model) on chat data; save the full (LoRA-merged) model to `out`.

    `data`: a `TextSource`, a path or Hub id (`data.load_sft_dataset`), or a `datasets` dataset. The loss covers
    only the assistant answers. Keyword `overrides` set `InstructConfig` fields. The entry point of
    `hf-minitron sft` and of the build's SFT stage.
    """
    if resume and os.path.isfile(os.path.join(out, RESULT_FILE)):
        with open(os.path.join(out, RESULT_FILE)) as f:
            return json.load(f)
    started = os.path.isdir(out) and any(Path(out).glob("checkpoint-*"))
    finished = os.path.isdir(out) and os.path.isfile(os.path.join(out, "config.json"))
    if not resume and not overwrite and (finished or started):
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
    config = trainer_config(InstructConfig, config, out, overrides)
    if config.chat_template:
        tokenizer.chat_template = _read_template(config.chat_template)
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {spec!r} has no chat template; pass chat_template (a .jinja file, "
                         f"a tokenizer folder or the template text)")

    from .data import load_sft_dataset

    dataset = load_sft_dataset(data)
    assistant_masks = "messages" in dataset.column_names and has_generation_markers(tokenizer.chat_template)
    if "messages" in dataset.column_names and not assistant_masks:
        dataset = dataset.map(last_turn_as_completion, remove_columns=dataset.column_names)
    config.assistant_only_loss = assistant_masks
    config.completion_only_loss = None if assistant_masks else True

    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.lora_target, task_type="CAUSAL_LM")
    model.train()
    set_seed(config.seed)  # the LoRA adapters are initialised inside SFTTrainer, before it seeds anything
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[SaveOnInterrupt()])
    train_out = trainer.train(resume_from_checkpoint=last_complete_checkpoint(out) if resume else None)
    if config.lora:  # adapters folded in: the output never depends on a base model
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(out)
    tokens = max([h.get("num_tokens", 0) for h in trainer.state.log_history] + [0])
    result = {"out": out, "model": spec, "steps": trainer.state.global_step, "train_loss": train_out.training_loss,
              "tokens": int(tokens),
              "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "target": config.lora_target}
              if config.lora else None,
              "loss_on": "assistant turns" if assistant_masks else "completions", "examples": len(dataset),
              "log_history": trainer.state.log_history}
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=1)
        if not config.keep_checkpoints:
            drop_checkpoints(out)
    return result
