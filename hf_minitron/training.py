"""What every stage that trains a whole model on text shares (distillation, teacher correction, SFT): the TRL
config base with pretraining-style defaults, the bf16 default, a config with the stage's overrides, the dataset."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.trainer_utils import SchedulerType
from trl import SFTConfig

from .losses import check_loss_name
from .schedule import check_schedule

# set by the stage from its inputs (--out, the data's text column, the token budget, the model flags), never by a
# recipe key or a flag of their own
EXCLUDED = ("output_dir", "dataset_text_field", "max_steps", "trust_remote_code")
TrainDtype = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass
class TextTrainingConfig(SFTConfig):
    """`SFTConfig` with pretraining-style defaults: packed plain text, a token budget, fp32 master weights, a
    cosine decay to a minimum learning rate, a batch in tokens. The base of every stage that trains a whole model
    on the text corpus (distillation, teacher correction)."""

    tokens: int | None = field(default=None, metadata={
        "help": "training token budget (e.g. 100M); sets max_steps from the batch size, window and processes"})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "keep the checkpoint-* folders once the model is saved (default: delete them)"})
    # defaults that differ from SFTConfig: pretraining-style packing, no mixed precision on CPU
    packing: bool = field(default=True, metadata={"help": "pack documents into windows of max_length tokens"})
    packing_strategy: str = field(default="wrapped", metadata={
        "help": "'wrapped' cuts documents to fill every window (no padding-free attention needed)"})
    max_length: int | None = field(default=1024, metadata={"help": "tokens per packed training window"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast, weights kept fp32 (default: on where bf16 is native: a bf16-capable GPU, or "
                "with no GPU a CPU with AVX512-BF16/AMX)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    lr_scheduler_type: SchedulerType | str = field(default="cosine_with_min_lr", metadata={
        "help": "learning-rate schedule (transformers SchedulerType); cosine_with_min_lr decays to min_lr"})
    min_lr: float | None = field(default=1e-5, metadata={
        "help": "final learning rate of cosine_with_min_lr (arXiv 2408.11796 decays 1e-4 to 1e-5 for "
                "Llama-3.1-Minitron-4B); ignored when lr_scheduler_kwargs gives min_lr_rate"})
    global_batch_tokens: int | None = field(default=None, metadata={
        "help": "tokens per optimizer step over all processes (e.g. 4M): sets gradient_accumulation_steps from "
                "per_device_train_batch_size x max_length x processes, so a recipe means the same on 1 or 8 GPUs"})
    train_dtype: TrainDtype = field(default="float32", metadata={
        "help": "dtype of the trained model's weights and optimizer states while training: float32 keeps fp32 "
                "master weights (bf16/fp16 then only as autocast); auto: the dtype it was loaded in. The saved "
                "model keeps the dtype it was loaded in (the teacher's, for a pruned student)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass (less memory, ~30% slower)"})
    save_total_limit: int | None = field(default=2, metadata={
        "help": "checkpoints kept while training (the newest; none: all)"})

    def __post_init__(self):
        default_bf16(self)
        super().__post_init__()
        check_loss_name(self.train_dtype, typing.get_args(TrainDtype), "train_dtype")
        check_schedule(self, world_size=1)


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles). There bf16 autocast takes a
    distillation step in 0.68x the fp32 time (bench/RESULTS.md); elsewhere oneDNN emulates it, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_bf16(args) -> None:
    """bf16 left unset means on where the device multiplies bf16 natively: a bf16-capable GPU, or with no GPU a
    CPU with AVX512-BF16/AMX (distillation and SFT alike; weights stay fp32, bf16 is autocast). bf16 without a GPU
    trains on the CPU, which transformers wants said (`use_cpu`). Under `accelerate launch` its mixed-precision
    setting decides instead (the launched processes' accelerator state is already fixed to it)."""
    args.bf16 = effective_bf16(args.bf16, args.fp16)
    if args.bf16 and not torch.accelerator.is_available():
        args.use_cpu = True


def effective_bf16(bf16: bool | None, fp16: bool = False) -> bool:
    """Whether a training config's `bf16` setting (None: unset) trains under bf16 autocast here."""
    return bf16_by_default() if bf16 is None and not fp16 else bool(bf16)


def bf16_by_default() -> bool:
    """What an unset `bf16` becomes here (see `default_bf16`); the plan times its steps the same way."""
    from transformers.utils import is_torch_bf16_gpu_available

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched == "bf16"
    return is_torch_bf16_gpu_available() if torch.accelerator.is_available() else native_cpu_bf16()


def trainer_config(cls, config, out: str, overrides: dict):
    """`config` (or a new `cls`) with `overrides` and `out` as its output folder."""
    if config is None:
        return cls(output_dir=out, **overrides)
    for key, value in {**overrides, "output_dir": out}.items():  # set, not dataclasses.replace: TrainingArguments'
        setattr(config, key, value)  # __post_init__ does not re-run cleanly
    return config


def text_dataset(data, text_column: str = "text", streaming: bool = False):
    """(text column, dataset) to train on, for a path / Hub id, a `TextSource`, or a `datasets` dataset: the data
    argument of `distill` and of teacher correction."""
    from .data import TextSource, load_text_dataset

    if isinstance(data, (str, TextSource)):
        src = TextSource(data, text_column=text_column, streaming=streaming) if isinstance(data, str) else data
        return src.text_column, load_text_dataset(src)
    if data.column_names is not None and text_column not in data.column_names:
        raise ValueError(f"dataset has no column {text_column!r}; columns: {', '.join(data.column_names)}")
    return text_column, data
