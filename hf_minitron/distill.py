"""Knowledge distillation (Minitron, arXiv 2407.14679) on pretraining-style packed text, on TRL; off-policy, or
partly on the student's own samples (`on_policy`, see `on_policy.py`).

`MinitronDistillTrainer` is a `trl.SFTTrainer` (plain-text datasets, packing, checkpoints, resume, accelerate) whose
`compute_loss` is  L = w_clm * L_CLM + w_logit * L_logit + alpha * L_is. Neither model's full logits are built:
both bodies return hidden states and the logit losses run over token chunks (see `losses.py`); the state pairs of
L_is are chosen in `intermediate.py`. The student trains with fp32 weights by default (`train_dtype`; bf16 only as
autocast, so small updates are not rounded away late in the schedule) and is saved in the dtype it came in.
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from .archs import count_parameters, logit_transform
from .checkpoints import SaveOnInterrupt, drop_checkpoints, last_complete_checkpoint
from .intermediate import (AUTO, SITES, Projection, Site, StateReader, attention_relation_loss, build_projections,
                           check_layer_spec, check_relation_heads, kept_layers_for, pair_projections, resolve_pairs)
from .on_policy import is_on_policy_step, student_windows
from .unlikelihood import UNLIKELIHOOD_NGRAM, unlikelihood_loss
from .models import check_same_tokenizer, load_model_spec, set_config_dtype
from .losses import (LOGIT_LOSSES, STATE_LOSSES, LogitLoss, StateLoss, check_loss_name, chunked_logit_losses,
                     intermediate_losses)
from .rundir import DISTILL_FILE, PRUNING_FILE
from .schedule import resolve_schedule
from .training import EXCLUDED, TextTrainingConfig, text_dataset, trainer_config  # noqa: F401 (the stages' API)
from .utils import read_json

PROJ_ATTR = "minitron_is_projections"  # student submodule holding the L_is projections during training
PROJ_FILE = "is_projections.safetensors"  # where checkpoints keep them (never in the student's weights)
RESULT_FILE = DISTILL_FILE  # named in rundir.py, with every artefact of a run
@dataclass
class DistillConfig(TextTrainingConfig):
    """`TextTrainingConfig` plus the Minitron loss settings.

    The recipe's `distill:` section and `hf-minitron distill`'s flags are these fields (less `EXCLUDED`).
    """

    tokens: int | None = field(default=None, metadata={
        "help": "distillation token budget (e.g. 100M); sets max_steps from the batch size, window and processes"})
    logit_loss: LogitLoss = field(default="forward_kl", metadata={
        "help": "divergence between next-token distributions"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature tau for the logit loss"})
    top_k: int | None = field(default=None, metadata={
        "help": "keep only the teacher's K largest logits per token (None: the whole shared vocabulary)"})
    jsd_beta: float = field(default=0.5, metadata={
        "help": "generalized JSD mixture weight beta (0 = forward KL, 1 = reverse KL)"})
    w_logit: float = field(default=1.0, metadata={"help": "weight of L_logit"})
    w_clm: float = field(default=0.0, metadata={"help": "weight of the cross-entropy L_CLM with the data labels"})
    is_layers: str | None = field(default=AUTO, metadata={
        "help": "intermediate-state pairs 'teacher:student,...' as hidden-state indices (0 = embedding output, "
                "i = output of block i); 'auto': when the student keeps fewer than 3/4 of the teacher's layers, "
                "0:0 plus each student block s mapped to teacher block round(s*Lt/Ls) (paper best practice 6), "
                "else none; 'off' or empty: no L_is"})
    is_sites: list[Site] = field(default_factory=lambda: ["block"], metadata={
        "help": "where each is_layers pair is compared: block (that hidden state: L_emb, L_o), mlp_input (L_i: the "
                "residual stream entering block i's MLP) and/or attention (L_att: KL of block i's causal Q-Q, K-K, "
                "V-V relations, MiniLMv2-style, no projection), e.g. block,attention"})
    is_loss: StateLoss = field(default="cosine", metadata={
        "help": "intermediate-state loss: cosine (1 - cos over channels, NVIDIA's choice) or mse"})
    is_projection: Projection = field(default="shared", metadata={
        "help": "learned Linear(h_s, h_t) with bias from student to teacher states: one shared by all pairs "
                "(NVIDIA's) or one per pair; identity-initialised when the widths match; kept in checkpoints, "
                "never in the saved student"})
    att_relation_heads: int = field(default=8, metadata={
        "help": "relation heads R of the attention site: Q, K and V are each split into R heads (every q/k/v width "
                "of both models must be divisible by R); relations are [batch, R, seq, seq], fine up to a few "
                "thousand tokens per window"})
    alpha: float | None = field(default=None, metadata={
        "help": "weight of L_is; None: dynamic alpha = L_logit / L_is (detached), as in the paper"})
    on_policy: float = field(default=0.0, metadata={
        "help": "fraction of optimizer steps trained on the student's own text (on-policy KD, GKD's lambda): each "
                "window's first on_policy_prompt tokens are continued by the student, sampled at temperature 1, "
                "and the losses score the sampled tokens: the contexts the student's own decoding leads to. Each "
                "such step costs a generation (3.5x an off-policy step on the quickstart's 70m, where 0.5 neither "
                "lowered perplexity nor stopped greedy loops: bench/RESULTS.md). Needs the live teacher"})
    on_policy_prompt: int | None = field(default=None, metadata={
        "help": "tokens of each window kept as the prompt of an on-policy step (the rest is sampled) and of an "
                "unlikelihood step (the rest is decoded greedily); None: 32, or half the window if that is less"})
    unlikelihood: float = field(default=0.0, metadata={
        "help": "fraction of optimizer steps that also train against greedy repetition loops (sequence-level "
                "unlikelihood, Welleck et al. 2019): each window's first on_policy_prompt tokens are continued "
                "greedily by the student for unlikelihood_tokens tokens, and every token of a 4-gram repeated in "
                "that continuation adds -log(1 - p) to the loss. On the quickstart's 70m, 1.0 cut the share of "
                "held-out prompts whose greedy text loops from 80-89% to 0-16%, for 7-30% more perplexity at equal "
                "tokens and 1.9x the time per step (bench/RESULTS.md)"})
    unlikelihood_weight: float = field(default=1.0, metadata={
        "help": "weight of the unlikelihood loss (mean over the continuation's tokens) beside the KD loss"})
    unlikelihood_tokens: int = field(default=64, metadata={
        "help": "tokens each unlikelihood step's greedy continuation runs (longer exposes more of a loop)"})
    kd_chunk_tokens: int = field(default=1024, metadata={
        "help": "tokens per chunk of the logit loss (peak loss memory ~ chunk x vocab); 0 = no chunking"})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "a teacher-logit cache folder (hf-minitron teacher-logits): train on its windows against its top-K "
                "(sparse forward KL), never loading the teacher; no intermediate-state losses. In a build also "
                "'auto': the build writes one cache per teacher, data and window (teacher_cache_top_k) and every "
                "search candidate and distillation from that teacher reads it; 'off' or empty: the live teacher"})
    teacher_fsdp: bool = field(default=True, metadata={
        "help": "under FSDP (an accelerate FSDP config), shard the teacher's decoder layers like the student's: "
                "each process holds 1/N of them and gathers one at a time in the forward (embeddings and LM head "
                "stay whole); false: every process keeps the whole teacher (on --teacher-device)"})
    teacher_cache_top_k: int = field(default=512, metadata={
        "help": "K of the caches a build's teacher_cache 'auto' writes (build only; hf-minitron teacher-logits has "
                "--top-k): the teacher's K most likely tokens per position, plus one bucket for the rest"})
    teacher_cache_top_p: float | None = field(default=None, metadata={
        "help": "top-P of those caches (build only; --top-p of hf-minitron teacher-logits): per token only the "
                "fewest of the top-K whose probabilities add up to P; none: always K"})

    def __post_init__(self):
        if self.ddp_find_unused_parameters is None:
            # the LM head and projections get their gradients from the loss, outside the forward: DDP's unused-
            # parameter search would mark them ready too early
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        check_loss_name(self.logit_loss, LOGIT_LOSSES, "logit loss")
        if self.teacher_cache in ("", "off", "none"):
            self.teacher_cache = None
        check_loss_name(self.is_loss, STATE_LOSSES, "intermediate-state loss")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_layer_spec(self.is_layers)
        for site in self.is_sites:
            check_loss_name(site, SITES, "is_sites entry")
        check_loss_name(self.is_projection, typing.get_args(Projection), "is_projection")
        if self.att_relation_heads < 1:
            raise ValueError(f"att_relation_heads must be >= 1, got {self.att_relation_heads}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"on_policy must be a fraction in [0, 1], got {self.on_policy}")
        if self.on_policy and self.teacher_cache:
            raise ValueError(f"on_policy={self.on_policy} needs the live teacher to score the student's samples; "
                             f"turn teacher_cache ({self.teacher_cache!r}) off")
        if not 0.0 <= self.unlikelihood <= 1.0:
            raise ValueError(f"unlikelihood must be a fraction in [0, 1], got {self.unlikelihood}")
        if self.unlikelihood and self.teacher_cache:
            raise ValueError(f"unlikelihood={self.unlikelihood} is not implemented on a teacher cache's trainer; "
                             f"turn teacher_cache ({self.teacher_cache!r}) off")
        if self.unlikelihood and self.unlikelihood_tokens < UNLIKELIHOOD_NGRAM:
            raise ValueError(f"unlikelihood_tokens must be >= {UNLIKELIHOOD_NGRAM} (one n-gram), got "
                             f"{self.unlikelihood_tokens}")
        if self.on_policy_prompt is None:
            self.on_policy_prompt = min(32, (self.max_length or 64) // 2)
        if (self.on_policy or self.unlikelihood) and not 1 <= self.on_policy_prompt < (self.max_length or 0):
            raise ValueError(f"on_policy_prompt must be in 1..max_length-1 ({(self.max_length or 0) - 1}), got "
                             f"{self.on_policy_prompt}")


class MinitronDistillTrainer(SFTTrainer):
    """SFTTrainer whose loss is the Minitron KD loss against a frozen `teacher`."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulation window's token count itself

    def __init__(self, model, teacher, args: DistillConfig, pruning: dict | None = None, **kwargs):
        """`pruning`: the student's pruning record (pruning.json), which says which teacher blocks it kept."""
        self.teacher = teacher.eval().requires_grad_(False)
        resolve_schedule(args)
        n_t, n_s = teacher.config.num_hidden_layers, model.config.num_hidden_layers
        kept = kept_layers_for(pruning, n_t, count_parameters(teacher.config), n_s)
        self.state_pairs, self.is_note = resolve_pairs(args.is_layers, args.is_sites, n_t, n_s, kept)
        if self.is_note and args.process_index == 0:
            print(self.is_note, flush=True)
        self.att_index = [i for i, p in enumerate(self.state_pairs) if p.site == "attention"]  # L_att: no projection
        self.proj_index = [i for i, p in enumerate(self.state_pairs) if p.site != "attention"]
        if self.att_index:
            check_relation_heads(model.config, teacher.config, args.att_relation_heads)
        if self.proj_index and not hasattr(model, PROJ_ATTR):
            projs = build_projections(len(self.proj_index), model.config.hidden_size, teacher.config.hidden_size,
                                      args.is_projection, args.seed)
            # a submodule, so DDP/FSDP sync it and the optimizer sees it; `_save` keeps it out of the student
            model.add_module(PROJ_ATTR, projs.to(device=model.device, dtype=model.dtype))
        self.s_reader = StateReader(model, [(p.site, p.student) for p in self.state_pairs])
        self.t_reader = StateReader(teacher, [(p.site, p.teacher) for p in self.state_pairs])
        self.logit_transforms = (logit_transform(model.config), logit_transform(teacher.config))
        self.save_dtype: torch.dtype | None = None  # set for the final save: the student's weights are cast to it
        super().__init__(model=model, args=args, **kwargs)
        if self.is_fsdp_enabled and args.teacher_fsdp:
            from .sharding import shard_teacher

            self.teacher = shard_teacher(self.teacher, self.accelerator)
        self.model_accepts_loss_kwargs = True  # so Trainer counts num_items_in_batch over the accumulation window

    # ---- loss ---------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # under bf16/fp16 the teacher's forward and both LM heads run in the student's autocast too (accelerate
        # wraps only the prepared model's forward): on a CPU with native bf16 that is most of the step's matmuls
        with self.accelerator.autocast():
            return self._minitron_loss(model, inputs, return_outputs, num_items_in_batch)

    def _minitron_loss(self, model, inputs, return_outputs, num_items_in_batch):
        cfg: DistillConfig = self.args
        prompt_ids = inputs["input_ids"][:, :cfg.on_policy_prompt]  # before an on-policy step replaces the window
        if model.training and cfg.on_policy:
            on = is_on_policy_step(cfg.on_policy, cfg.seed, self.state.global_step)
            self._metrics["train"]["on_policy"].append(float(on))  # logged: the share of on-policy steps
            if on:
                inputs, num_items_in_batch = self._on_policy_inputs(model, inputs, num_items_in_batch)
        labels = inputs["labels"]
        fwd = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        mask = labels[:, 1:] != -100  # positions whose next token is scored
        none = torch.empty(0, dtype=torch.long, device=labels.device)
        with self.s_reader.capturing():
            out = model(**fwd, use_cache=False, output_hidden_states=True, logits_to_keep=none)
        s_final, s_states = out.hidden_states[-1], self.s_reader.states(out.hidden_states)
        del out
        t_dev = self.teacher.device
        with torch.no_grad(), self.t_reader.capturing():
            t_out = self.teacher(**{k: v.to(t_dev) for k, v in fwd.items()}, use_cache=False,
                                 output_hidden_states=True, logits_to_keep=none.to(t_dev))
            t_final, t_states = t_out.hidden_states[-1], self.t_reader.states(t_out.hidden_states)
            del t_out
        # a teacher dispatched over several GPUs (--device auto) leaves each state on its layer's GPU
        t_states = [_to_device(h, s_final.device) for h in t_states]
        t_mask = mask.to(t_final.device)
        unwrapped = self.accelerator.unwrap_model(model)
        kd_sum, ce_sum = chunked_logit_losses(
            s_final[:, :-1][mask], t_final[:, :-1][t_mask], labels[:, 1:][mask],
            unwrapped.get_output_embeddings(), self.teacher.get_output_embeddings(), kind=cfg.logit_loss,
            temperature=cfg.temperature, top_k=cfg.top_k, beta=cfg.jsd_beta, chunk_tokens=cfg.kd_chunk_tokens,
            with_ce=cfg.w_clm != 0, student_transform=self.logit_transforms[0],
            teacher_transform=self.logit_transforms[1])
        n_local = mask.sum()
        n = num_items_in_batch if num_items_in_batch is not None else n_local.clamp(min=1)
        l_logit, l_clm = kd_sum / n, ce_sum / n
        loss = cfg.w_logit * l_logit + cfg.w_clm * l_clm
        l_is = att_sum = None
        if self.state_pairs:  # L_is: the token sums of every pair (states and attention relations), pair-averaged
            is_sum = kd_sum.new_zeros(())
            if self.proj_index:
                projs = pair_projections(getattr(unwrapped, PROJ_ATTR), len(self.proj_index))
                is_sum = len(projs) * intermediate_losses([s_states[i][:, :-1][mask] for i in self.proj_index],
                                                          [t_states[i][:, :-1][mask] for i in self.proj_index],
                                                          projs, cfg.is_loss)
            if self.att_index:
                att_sum = attention_relation_loss([s_states[i] for i in self.att_index],
                                                  [t_states[i] for i in self.att_index], mask,
                                                  cfg.att_relation_heads, fwd.get("attention_mask"))
                is_sum = is_sum + att_sum
            l_is = is_sum / len(self.state_pairs) / n
            alpha = cfg.alpha if cfg.alpha is not None else (l_logit / l_is.clamp(min=1e-12)).detach()
            loss = loss + alpha * l_is
        if num_items_in_batch is None and model.training:
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        elif cfg.average_tokens_across_devices:  # n counts every rank's tokens; DDP averages gradients
            loss = loss * self.accelerator.num_processes
        if model.training and cfg.unlikelihood and is_on_policy_step(cfg.unlikelihood, cfg.seed, self.state.global_step,
                                                                     stream=1):
            loss = loss + cfg.unlikelihood_weight * self._unlikelihood(model, prompt_ids) / getattr(
                self, "current_gradient_accumulation_steps", 1)
        self._log_parts(kd_sum, ce_sum, l_is, n, n_local, fwd, att_sum)
        return (loss, None) if return_outputs else loss

    def _unlikelihood(self, model, prompt_ids):
        cfg: DistillConfig = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        vocab = min(unwrapped.get_output_embeddings().out_features, self.teacher.get_output_embeddings().out_features)
        pad = self.processing_class.pad_token_id if self.processing_class is not None else None
        ul, share = unlikelihood_loss(model, unwrapped, prompt_ids, cfg.unlikelihood_tokens, pad,
                                      self.logit_transforms[0], vocab)
        self._metrics["train"]["unlikelihood"].append(ul.item())
        self._metrics["train"]["repeat_share"].append(share)  # the continuations' share of repeated tokens
        return ul

    def _on_policy_inputs(self, model, inputs, num_items_in_batch):
        """The batch's windows continued by the student; the token count rescaled to the sampled tokens."""
        before = (inputs["labels"][:, 1:] != -100).sum()
        pad = self.processing_class.pad_token_id if self.processing_class is not None else None
        new = student_windows(self.accelerator.unwrap_model(model), inputs["input_ids"], self.args.on_policy_prompt,
                              pad)
        if num_items_in_batch is not None:  # the accumulation window's count, less the prompt tokens
            num_items_in_batch = num_items_in_batch * (new["labels"][:, 1:] != -100).sum() / before.clamp(min=1)
        return new, num_items_in_batch

    def _log_parts(self, kd_sum, ce_sum, l_is, n, n_local, fwd, att_sum=None) -> None:
        mode = "train" if self.model.training else "eval"
        denom = n_local.clamp(min=1).item()
        m = self._metrics[mode]
        m["kd_logit"].append(kd_sum.item() / denom)
        if self.args.w_clm:
            m["clm"].append(ce_sum.item() / denom)
        if l_is is not None:
            m["kd_is"].append((l_is * n).item() / denom)
        if att_sum is not None:  # L_att alone, per pair (already inside kd_is)
            m["kd_att"].append(att_sum.item() / len(self.att_index) / denom)
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
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        checkpoint = os.path.basename(output_dir).startswith(PREFIX_CHECKPOINT_DIR)
        cast = self.save_dtype if not checkpoint else None  # checkpoints keep the training weights, to resume
        if cast is not None:
            state_dict = {k: v.to(cast) if v.is_floating_point() else v for k, v in state_dict.items()}
        super()._save(output_dir, state_dict=state_dict)
        if cast is not None and self.args.should_save:
            set_config_dtype(output_dir, cast)
        if proj and self.args.should_save and checkpoint:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in proj.items()}, os.path.join(output_dir, PROJ_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJ_FILE)
        projs = getattr(self.accelerator.unwrap_model(model or self.model), PROJ_ATTR, None)
        if projs is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            projs.load_state_dict(load_file(path, device=str(projs[0].weight.device)))


def _to_device(state, device):
    """A captured state (a tensor, or the attention site's (q, k, v)) on `device`."""
    return tuple(x.to(device) for x in state) if isinstance(state, tuple) else state.to(device)


def _finished(out: str) -> bool:
    return any(os.path.isfile(os.path.join(out, f)) for f in (RESULT_FILE, "model.safetensors", "config.json"))


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
    student_model, student_tok = load_model_spec(student, student_dtype, "cpu")
    save_dtype = student_model.dtype
    if config.train_dtype != "auto":  # fp32 master weights by default; bf16/fp16 only as autocast
        student_model.to(getattr(torch, config.train_dtype))
    train_dtype = student_model.dtype
    cache = None
    if config.teacher_cache == "auto":
        raise ValueError("teacher_cache 'auto' is for builds (one cache per teacher, data and window in the run "
                         "folder); for one run write a cache with `hf-minitron teacher-logits --out CACHE` and pass "
                         "--teacher-cache CACHE")
    if config.teacher_cache:  # the teacher's top-K come from disk: it is never loaded
        from .cached_distill import CachedDistillTrainer, TeacherCache, cached_dataset

        cache, teacher_model, teacher_tok = TeacherCache(config.teacher_cache), None, None
    else:
        teacher_model, teacher_tok = load_model_spec(teacher, teacher_dtype, teacher_device or device)
    tokenizer = tokenizer or student_tok or teacher_tok
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer= when giving loaded models")
    if cache is None:
        check_same_tokenizer(tokenizer, teacher_tokenizer or teacher_tok)
        shared = min(student_model.config.vocab_size, teacher_model.config.vocab_size)
        if len(tokenizer) > shared:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the models share only {shared} logits")
        if teacher_device and not isinstance(teacher, str):
            teacher_model.to(teacher_device)

    if cache is not None:
        dataset = cached_dataset(cache, config, student_model, tokenizer, teacher, data, text_column)
    else:
        config.dataset_text_field, dataset = text_dataset(data, text_column, streaming)

    from .sharding import enable_cpu_fsdp, refuse_zero3

    refuse_zero3()
    enable_cpu_fsdp(cpu=torch.device(device).type == "cpu")  # a CPU FSDP launch is FSDP, not DDP (sharding.py)
    resolve_schedule(config)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.max_length
    per_step *= config.world_size
    config.max_steps = math.ceil(max_tokens / per_step)
    student_model.train()
    pruning = read_json(Path(student, PRUNING_FILE)) if isinstance(student, str) else None  # which blocks it kept
    extra = {} if cache else {"pruning": pruning}
    trainer = (CachedDistillTrainer if cache else MinitronDistillTrainer)(
        student_model, cache or teacher_model, config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[SaveOnInterrupt()], **extra)
    last = last_complete_checkpoint(out) if resume else None
    train_out = trainer.train(resume_from_checkpoint=last)
    trainer.save_dtype = save_dtype
    if trainer.is_fsdp_enabled:  # checkpoints may be sharded; the student leaves as one plain from_pretrained folder
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(out)
    result = {
        "out": out, "steps": trainer.state.global_step, "tokens": trainer.state.global_step * per_step,
        "train_loss": train_out.training_loss, "max_tokens": max_tokens,
        "teacher": teacher if isinstance(teacher, str) else (cache.meta["teacher"]["source"] if cache
                                                             else teacher_model.name_or_path),
        "teacher_cache": config.teacher_cache,
        "student": student if isinstance(student, str) else student_model.name_or_path,
        "losses": {k: getattr(config, k) for k in ("logit_loss", "temperature", "top_k", "jsd_beta", "w_logit",
                                                    "w_clm", "is_layers", "is_sites", "is_loss", "is_projection",
                                                    "att_relation_heads", "alpha", "on_policy", "on_policy_prompt",
                                                    "unlikelihood", "unlikelihood_weight", "unlikelihood_tokens")},
        "is_pairs": [str(p) for p in trainer.state_pairs], "is_policy": trainer.is_note or None,
        "dtypes": {"trained": str(train_dtype)[6:], "saved": str(save_dtype)[6:]},  # str(torch.x) = "torch.x"
        "tokens_per_step": per_step, "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "log_history": trainer.state.log_history,
    }
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=1)
    if hasattr(student_model, PROJ_ATTR):
        delattr(student_model, PROJ_ATTR)
    for reader in (trainer.s_reader, trainer.t_reader):  # the teacher may serve other members: unhook it
        reader.remove()
    if not config.keep_checkpoints and trainer.accelerator.is_main_process:
        drop_checkpoints(out)
    return result
