"""Teacher correction (arXiv 2408.11796): fine-tune the teacher briefly on the distillation corpus before importance
and distillation, for when the teacher's own pretraining data is not available.

The follow-up report found that, distilling on a corpus the teacher was not trained on, a lightly fine-tuned teacher
guides the student better; NVIDIA's NeMo tutorial does the same step ("02_teacher_finetuning") and then prunes and
distils from the corrected teacher. Training is plain language modelling (cross-entropy on every token of packed
text) with TRL's `SFTTrainer`, fp32 master weights by default; the corrected teacher is saved in the dtype it came
in. The output folder appears whole: everything (checkpoints included) is written in `<out>.tmp`, renamed at the end.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTTrainer

from .checkpoints import SaveOnInterrupt, drop_checkpoints, last_complete_checkpoint
from .training import EXCLUDED as TRAINER_EXCLUDED
from .training import TextTrainingConfig, text_dataset, trainer_config
from .models import set_config_dtype
from .rundir import CORRECTION_FILE, StageOutput, hash_folder
from .schedule import resolve_schedule
from .utils import read_json

RESULT_FILE = CORRECTION_FILE  # named in rundir.py, with every artefact of a run
STAGING_SUFFIX = ".tmp"  # <out>.tmp: the folder being written (checkpoints, then the model), renamed to <out>
PROBE_WINDOWS = 4  # training windows whose loss is measured before and after (one forward each)
EXCLUDED = TRAINER_EXCLUDED  # fields the stage sets from its inputs, never a recipe key (as distill's)
TOKENS_KEY = "teacher_correction"  # the stage's entry in a StageOutput's tokens


@dataclass
class CorrectionConfig(TextTrainingConfig):
    """The training settings of teacher correction: the recipe's `teacher_correction:` section (less `EXCLUDED`).
    Same defaults as distillation (packed text, fp32 master weights, cosine 1e-4 to 1e-5, as NVIDIA's NeMo teacher
    fine-tuning tutorial also uses); `tokens` none or 0 means no correction."""

    tokens: int | None = field(default=None, metadata={"min": 0, "help": (
        "teacher-correction token budget (e.g. 500M): fine-tune the teacher on the distillation corpus before "
        "importance and distillation (arXiv 2408.11796 found this helps when the teacher's original pretraining "
        "data is not available: the corrected teacher guides the student better); none or 0: off")})

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


class CorrectionTrainer(SFTTrainer):
    """SFTTrainer whose final save (not its checkpoints) casts the weights to `save_dtype`."""

    save_dtype: torch.dtype | None = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        cast = self.save_dtype
        if cast is not None:
            if state_dict is None:
                state_dict = self.accelerator.unwrap_model(self.model).state_dict()
            state_dict = {k: v.to(cast) if v.is_floating_point() else v for k, v in state_dict.items()}
        super()._save(output_dir, state_dict=state_dict)
        if cast is not None and self.args.should_save:
            set_config_dtype(output_dir or self.args.output_dir, cast)


def staging_folder(out: str | Path) -> Path:
    """Where `correct_teacher` writes before the rename: checkpoints to resume from live here."""
    out = Path(out)
    return out.with_name(out.name + STAGING_SUFFIX)


def correct_teacher(model, tokenizer, data, out: str | Path, config: CorrectionConfig, resume: bool = True,
                    progress: bool = True, *, text_column: str = "text") -> StageOutput:
    """Fine-tune a copy of `model` (a loaded causal LM; the caller's object is left as it is) on `data` for
    `config.tokens` tokens and save it to `out` (a from_pretrained folder in `model`'s dtype, with the tokenizer
    and `RESULT_FILE`).

    `data`: a path / Hub id, a `TextSource`, or a `datasets` dataset with a `text_column`. `resume`: a finished
    `out` is returned as it is (no training), an interrupted run continues from its newest complete checkpoint;
    without it, training starts over and a finished `out` is replaced once the new one is complete.
    """
    if not config.tokens:
        raise ValueError("teacher correction is off (tokens is none or 0): give a token budget (e.g. 500M) or skip "
                         "the stage")
    out = Path(out)
    done = read_json(out / RESULT_FILE)
    if out.exists() and done is None:
        raise FileExistsError(f"{str(out)!r} exists but holds no corrected teacher ({RESULT_FILE}); give another "
                              f"folder or remove it")
    if resume and done is not None:
        if done.get("max_tokens") != config.tokens:
            raise ValueError(f"{str(out)!r} holds a teacher corrected on {done.get('max_tokens')} tokens, not "
                             f"{config.tokens}; pass resume=False to correct it again")
        return _stage_output(out, done)
    staging = staging_folder(out)
    if not resume:
        shutil.rmtree(staging, ignore_errors=True)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} logits")

    config = trainer_config(CorrectionConfig, config, str(staging), {"disable_tqdm": not progress})
    config.dataset_text_field, dataset = text_dataset(data, text_column)
    resolve_schedule(config)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.max_length
    per_step *= config.world_size
    config.max_steps = math.ceil(config.tokens / per_step)

    save_dtype = model.dtype
    work = copy.deepcopy(model)  # the caller's teacher stays as it was
    if config.train_dtype != "auto":  # fp32 master weights by default; bf16/fp16 only as autocast
        work.to(getattr(torch, config.train_dtype))
    trainer = CorrectionTrainer(model=work, args=config, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[SaveOnInterrupt()])
    probe = _probe_windows(trainer.train_dataset)
    before = _mean_loss(work, probe)
    train_out = trainer.train(resume_from_checkpoint=last_complete_checkpoint(staging) if resume else None)
    after = _mean_loss(work, probe)
    trainer.save_dtype = save_dtype
    trainer.save_model(str(staging))
    result = {
        "teacher": model.name_or_path, "steps": trainer.state.global_step,
        "tokens": trainer.state.global_step * per_step, "max_tokens": config.tokens, "tokens_per_step": per_step,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "train_loss": train_out.training_loss,
        "probe_loss": {"before": before, "after": after, "windows": len(probe)},
        "learning_rate": config.learning_rate, "lr_scheduler_type": str(getattr(config.lr_scheduler_type, "value",
                                                                                config.lr_scheduler_type)),
        "min_lr": config.min_lr, "dtypes": {"trained": str(work.dtype)[6:], "saved": str(save_dtype)[6:]},
        "log_history": trainer.state.log_history,
    }
    if trainer.accelerator.is_main_process:
        if not config.keep_checkpoints:
            drop_checkpoints(staging)
        (staging / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
        _replace(staging, out)
    trainer.accelerator.wait_for_everyone()
    return _stage_output(out, result)


def _replace(staging: Path, out: Path) -> None:
    """`staging` renamed to `out`; a previous `out` is moved aside first and deleted only after the rename."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _stage_output(out: Path, result: dict) -> StageOutput:
    probe = result.get("probe_loss") or {}
    return StageOutput(out, hash_folder(out), {TOKENS_KEY: result["tokens"]},
                       {"steps": result["steps"], "train_loss": result["train_loss"],
                        "probe_loss_before": probe.get("before"), "probe_loss_after": probe.get("after")})


def _probe_windows(dataset) -> list[list[int]]:
    """The first packed training windows (the same ones before and after training; no shuffling involved)."""
    return [row["input_ids"] for row in itertools.islice(iter(dataset), PROBE_WINDOWS)]


@torch.no_grad()
def _mean_loss(model, windows: list[list[int]]) -> float | None:
    """Mean next-token cross-entropy of `model` over `windows`, one forward each."""
    if not windows:
        return None
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    losses = []
    for ids in windows:
        x = torch.tensor([ids], device=device)
        losses.append(model(input_ids=x, labels=x, use_cache=False).loss.float().item())
    model.train(was_training)
    return sum(losses) / len(losses)
