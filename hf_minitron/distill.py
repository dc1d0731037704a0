"""Off-policy knowledge distillation (Minitron, arXiv 2407.14679) on pretraining-style packed text, on TRL.

`MinitronDistillTrainer` is a `trl.SFTTrainer` (plain-text datasets, packing, checkpoints, resume, accelerate) whose
`compute_loss` is  L = w_clm * L_CLM + w_logit * L_logit + alpha * L_is. Neither model's full logits are built:
both bodies return hidden states and the logit losses run over token chunks (see `losses.py`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from .rundir import DISTILL_FILE
from .checkpoints import drop_checkpoints, last_complete_checkpoint
from .losses import (LOGIT_LOSSES, STATE_LOSSES, LogitLoss, StateLoss, check_loss_name, chunked_logit_losses,
                      intermediate_losses)

PROJ_ATTR = "minitron_is_projections"  # student submodule holding the L_is projections during training
PROJ_FILE = "is_projections.safetensors"  # where checkpoints keep them (never in the student's weights)
RESULT_FILE = DISTILL_FILE  # named in rundir.py, with every artefact of a run
# set by the stage from its inputs (--out, the data's text column, the token budget, the model flags), never by a
# recipe key or a flag of their own
EXCLUDED = ("output_dir", "dataset_text_field", "max_steps", "trust_remote_code")


@dataclass
class DistillConfig(SFTConfig):
    """`SFTConfig` plus the Minitron loss settings and a token budget; defaults pack plain text into windows.

    The recipe's `distill:` section and `hf-minitron distill`'s flags are these fields (less `EXCLUDED`).
    """

    tokens: int | None = field(default=None, metadata={
        "help": "distillation token budget (e.g. 100M); sets max_steps from the batch size, window and processes"})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "keep the checkpoint-* folders once the student is saved (default: delete them)"})
    logit_loss: LogitLoss = field(default="forward_kl", metadata={
        "help": "divergence between next-token distributions"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature tau for the logit loss"})
    top_k: int | None = field(default=None, metadata={
        "help": "keep only the teacher's K largest logits per token (None: the whole shared vocabulary)"})
    jsd_beta: float = field(default=0.5, metadata={
        "help": "generalized JSD mixture weight beta (0 = forward KL, 1 = reverse KL)"})
    w_logit: float = field(default=1.0, metadata={"help": "weight of L_logit"})
    w_clm: float = field(default=0.0, metadata={"help": "weight of the cross-entropy L_CLM with the data labels"})
    is_layers: str | None = field(default=None, metadata={
        "help": "intermediate-state pairs 'teacher:student,...' as hidden-state indices (0 = embedding output, "
                "i = output of block i, so i-1 is block i's input); empty: no L_is"})
    is_loss: StateLoss = field(default="mse", metadata={"help": "intermediate-state loss"})
    alpha: float | None = field(default=None, metadata={
        "help": "weight of L_is; None: dynamic alpha = L_logit / L_is (detached), as in the paper"})
    kd_chunk_tokens: int = field(default=1024, metadata={
        "help": "tokens per chunk of the logit loss (peak loss memory ~ chunk x vocab); 0 = no chunking"})
    # defaults that differ from SFTConfig: pretraining-style packing, no mixed precision on CPU
    packing: bool = field(default=True, metadata={"help": "pack documents into windows of max_length tokens"})
    packing_strategy: str = field(default="wrapped", metadata={
        "help": "'wrapped' cuts documents to fill every window (no padding-free attention needed)"})
    max_length: int | None = field(default=1024, metadata={"help": "tokens per packed training window"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision (default: on when a bf16-capable CUDA device is present)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute student activations in the backward pass (less memory, ~30% slower)"})
    save_total_limit: int | None = field(default=2, metadata={
        "help": "checkpoints kept while training (the newest; none: all)"})

    def __post_init__(self):
        default_bf16(self)
        if self.ddp_find_unused_parameters is None:
            # the LM head and projections get their gradients from the loss, outside the forward: DDP's unused-
            # parameter search would mark them ready too early
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        check_loss_name(self.logit_loss, LOGIT_LOSSES, "logit loss")
        check_loss_name(self.is_loss, STATE_LOSSES, "intermediate-state loss")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        parse_layer_map(self.is_layers)


def default_bf16(args) -> None:
    """bf16 left unset means on where a bf16-capable CUDA device is present (distillation and SFT alike)."""
    if args.bf16 is None and not args.fp16:
        args.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def trainer_config(cls, config, out: str, overrides: dict):
    """`config` (or a new `cls`) with `overrides` and `out` as its output folder."""
    if config is None:
        return cls(output_dir=out, **overrides)
    for key, value in {**overrides, "output_dir": out}.items():  # set, not dataclasses.replace: TrainingArguments'
        setattr(config, key, value)  # __post_init__ does not re-run cleanly
    return config


def parse_layer_map(spec: str | None) -> list[tuple[int, int]]:
    """'t:s,t:s' -> [(t, s), ...] hidden-state index pairs."""
    if not spec:
        return []
    pairs = []
    for part in spec.split(","):
        try:
            t, s = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"bad is_layers entry {part!r}; expected 'teacher:student' integers, e.g. '0:0,8:4'"
                             ) from None
        pairs.append((t, s))
    return pairs


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """Distillation compares distributions token by token: the vocabularies must have the same contents."""
    if student_tok is None or teacher_tok is None:
        return
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        differ = sum(1 for tok, i in vs.items() if vt.get(tok) != i)
        raise ValueError(f"student and teacher tokenizers differ ({len(vs)} vs {len(vt)} tokens, {differ} ids "
                         f"disagree); distillation needs one tokenizer")


class MinitronDistillTrainer(SFTTrainer):
    """SFTTrainer whose loss is the Minitron KD loss against a frozen `teacher`."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulation window's token count itself

    def __init__(self, model, teacher, args: DistillConfig, **kwargs):
        self.teacher = teacher.eval().requires_grad_(False)
        self.layer_map = parse_layer_map(args.is_layers)
        n_t, n_s = teacher.config.num_hidden_layers, model.config.num_hidden_layers
        for t, s in self.layer_map:
            if not (0 <= t <= n_t and 0 <= s <= n_s):
                raise ValueError(f"is_layers pair {t}:{s} out of range: teacher has hidden states 0..{n_t}, "
                                 f"student 0..{n_s}")
        if self.layer_map and not hasattr(model, PROJ_ATTR):
            h_s, h_t = model.config.hidden_size, teacher.config.hidden_size
            with torch.random.fork_rng(devices=[]):  # same init in every process and run, whatever ran before
                torch.manual_seed(args.seed)
                projs = nn.ModuleList(nn.Linear(h_s, h_t, bias=False) for _ in self.layer_map)
            if h_s == h_t:
                for p in projs:
                    nn.init.eye_(p.weight)
            # a submodule, so DDP/FSDP sync it and the optimizer sees it; `_save` keeps it out of the student
            model.add_module(PROJ_ATTR, projs.to(device=model.device, dtype=model.dtype))
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = True  # so Trainer counts num_items_in_batch over the accumulation window

    # ---- loss ---------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg: DistillConfig = self.args
        labels = inputs["labels"]
        fwd = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        mask = labels[:, 1:] != -100  # positions whose next token is scored
        want = sorted({-1, *(s for _, s in self.layer_map)})
        none = torch.empty(0, dtype=torch.long, device=labels.device)
        out = model(**fwd, use_cache=False, output_hidden_states=True, logits_to_keep=none)
        s_states = {i: out.hidden_states[i] for i in want}
        del out
        t_dev = self.teacher.device
        with torch.no_grad():
            t_out = self.teacher(**{k: v.to(t_dev) for k, v in fwd.items()}, use_cache=False,
                                 output_hidden_states=True, logits_to_keep=none.to(t_dev))
            t_states = {i: t_out.hidden_states[i] for i in {-1, *(t for t, _ in self.layer_map)}}
            del t_out
        t_mask = mask.to(t_dev)
        unwrapped = self.accelerator.unwrap_model(model)
        kd_sum, ce_sum = chunked_logit_losses(
            s_states[-1][:, :-1][mask], t_states[-1][:, :-1][t_mask], labels[:, 1:][mask],
            unwrapped.get_output_embeddings(), self.teacher.get_output_embeddings(), kind=cfg.logit_loss,
            temperature=cfg.temperature, top_k=cfg.top_k, beta=cfg.jsd_beta, chunk_tokens=cfg.kd_chunk_tokens,
            with_ce=cfg.w_clm != 0)
        n_local = mask.sum()
        n = num_items_in_batch if num_items_in_batch is not None else n_local.clamp(min=1)
        l_logit, l_clm = kd_sum / n, ce_sum / n
        loss = cfg.w_logit * l_logit + cfg.w_clm * l_clm
        l_is = None
        if self.layer_map:
            is_sum = intermediate_losses([s_states[s][:, :-1][mask] for _, s in self.layer_map],
                                         [t_states[t][:, :-1][t_mask] for t, _ in self.layer_map],
                                         getattr(unwrapped, PROJ_ATTR), cfg.is_loss)
            l_is = is_sum / n
            alpha = cfg.alpha if cfg.alpha is not None else (l_logit / l_is.clamp(min=1e-12)).detach()
            loss = loss + alpha * l_is
        if num_items_in_batch is None and model.training:
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        elif cfg.average_tokens_across_devices:  # n counts every rank's tokens; DDP averages gradients
            loss = loss * self.accelerator.num_processes
        self._log_parts(kd_sum, ce_sum, l_is, n, n_local, fwd)
        return (loss, None) if return_outputs else loss

    def _log_parts(self, kd_sum, ce_sum, l_is, n, n_local, fwd) -> None:
        mode = "train" if self.model.training else "eval"
        denom = n_local.clamp(min=1).item()
        m = self._metrics[mode]
        m["kd_logit"].append(kd_sum.item() / denom)
        if self.args.w_clm:
            m["clm"].append(ce_sum.item() / denom)
        if l_is is not None:
            m["kd_is"].append((l_is * n).item() / denom)
        if mode == "train":
            self._total_train_tokens += fwd["input_ids"].numel() * self.accelerator.num_processes
        m["num_tokens"] = [self._total_train_tokens]

    # ---- the projections live in checkpoints, never in the student's weights --------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        prefix = PROJ_ATTR + "."
        proj = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        super()._save(output_dir, state_dict={k: v for k, v in state_dict.items() if not k.startswith(prefix)})
        if proj and self.args.should_save and os.path.basename(output_dir).startswith(PREFIX_CHECKPOINT_DIR):
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in proj.items()}, os.path.join(output_dir, PROJ_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJ_FILE)
        projs = getattr(self.accelerator.unwrap_model(model or self.model), PROJ_ATTR, None)
        if projs is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            projs.load_state_dict(load_file(path, device=str(projs[0].weight.device)))


def _finished(out: str) -> bool:
    return any(os.path.isfile(os.path.join(out, f)) for f in (RESULT_FILE, "model.safetensors", "config.json"))


def _load(spec, dtype, device):
    """A model spec (repo id / folder / .gguf) or an already loaded model -> (model, tokenizer or None)."""
    if not isinstance(spec, str):
        return spec, None
    from .models import load_model, load_tokenizer, resolve_source

    src = resolve_source(spec)
    return load_model(src, dtype=dtype, device=device), load_tokenizer(src)


def distill(teacher, student, data, out: str, max_tokens: int | None = None, *, config: DistillConfig | None = None,
            tokenizer=None, teacher_tokenizer=None, text_column: str = "text", streaming: bool = False,
            teacher_dtype: str | None = None, teacher_device: str | None = None, student_dtype: str | None = None,
            resume: bool = False, overwrite: bool = False, **overrides) -> dict:
    """Distil `teacher` into `student` on `data` for `max_tokens` (or `config.tokens`) tokens; save it to `out`.

    `teacher`/`student` are model specs or loaded models; `data` a text source (path/Hub id or `TextSource`) for
    `load_text_dataset`, or a `datasets` dataset with a `text_column`. Keyword `overrides` set `DistillConfig`
    fields. `resume` continues from the last checkpoint in `out`; a finished `out` is never overwritten unless
    `overwrite`. The entry point of `hf-minitron distill` and of the build's distill stage.
    """
    if resume and os.path.isfile(os.path.join(out, RESULT_FILE)):
        with open(os.path.join(out, RESULT_FILE)) as f:
            return json.load(f)  # already finished: nothing to redo
    started = os.path.isdir(out) and any(Path(out).glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
    if not resume and not overwrite and os.path.isdir(out) and (_finished(out) or started):
        raise FileExistsError(f"output folder {out!r} already holds a distilled model or checkpoints; pass "
                              f"resume=True (--resume) to continue or overwrite=True (--overwrite) to start again")
    config = trainer_config(DistillConfig, config, out, overrides)
    max_tokens = max_tokens if max_tokens is not None else config.tokens
    if max_tokens is None or max_tokens < 1:
        raise ValueError(f"the token budget must be a positive number of tokens (--tokens), got {max_tokens!r}")
    config.tokens = max_tokens
    config.dataset_text_field = text_column

    device = str(config.device)
    student_model, student_tok = _load(student, student_dtype, "cpu")
    teacher_model, teacher_tok = _load(teacher, teacher_dtype, teacher_device or device)
    tokenizer = tokenizer or student_tok or teacher_tok
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer= when giving loaded models")
    check_same_tokenizer(tokenizer, teacher_tokenizer or teacher_tok)
    shared = min(student_model.config.vocab_size, teacher_model.config.vocab_size)
    if len(tokenizer) > shared:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the models share only {shared} logits")
    if teacher_device and not isinstance(teacher, str):
        teacher_model.to(teacher_device)

    from .data import TextSource, load_text_dataset

    if isinstance(data, (str, TextSource)):
        src = TextSource(data, text_column=text_column, streaming=streaming) if isinstance(data, str) else data
        config.dataset_text_field = src.text_column
        dataset = load_text_dataset(src)
    else:
        dataset = data
        if dataset.column_names is not None and text_column not in dataset.column_names:
            raise ValueError(f"dataset has no column {text_column!r}; columns: {', '.join(dataset.column_names)}")

    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.max_length
    per_step *= config.world_size
    config.max_steps = math.ceil(max_tokens / per_step)
    student_model.train()
    trainer = MinitronDistillTrainer(student_model, teacher_model, config, train_dataset=dataset,
                                     processing_class=tokenizer)
    last = last_complete_checkpoint(out) if resume else None
    train_out = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(out)
    result = {
        "out": out, "steps": trainer.state.global_step, "tokens": trainer.state.global_step * per_step,
        "train_loss": train_out.training_loss, "max_tokens": max_tokens,
        "teacher": teacher if isinstance(teacher, str) else teacher_model.name_or_path,
        "student": student if isinstance(student, str) else student_model.name_or_path,
        "losses": {k: getattr(config, k) for k in ("logit_loss", "temperature", "top_k", "jsd_beta", "w_logit",
                                                    "w_clm", "is_layers", "is_loss", "alpha")},
        "log_history": trainer.state.log_history,
    }
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=1)
    if hasattr(student_model, PROJ_ATTR):
        delattr(student_model, PROJ_ATTR)
    if not config.keep_checkpoints and trainer.accelerator.is_main_process:
        drop_checkpoints(out)
    return result
