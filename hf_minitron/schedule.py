"""The optimizer-step schedule of distillation: a global batch in tokens whatever the process count, and the
cosine decay to a non-zero minimum learning rate of the follow-up report (arXiv 2408.11796)."""

from __future__ import annotations

from transformers.trainer_utils import SchedulerType

MIN_LR_SCHEDULES = (SchedulerType.COSINE_WITH_MIN_LR, SchedulerType.COSINE_WARMUP_WITH_MIN_LR)


def accumulation_steps(args, world_size: int) -> int:
    """gradient_accumulation_steps that make one optimizer step `global_batch_tokens` tokens."""
    g, b, n = args.global_batch_tokens, args.per_device_train_batch_size, args.max_length
    if not n:
        raise ValueError("global_batch_tokens needs max_length (tokens per packed window)")
    step = b * n * world_size
    if g < step or g % step:
        what = "is smaller than one step" if g < step else "is not a multiple of one step"
        raise ValueError(f"global_batch_tokens {g} {what}: per_device_train_batch_size {b} x max_length {n} x "
                         f"{world_size} processes = {step} tokens")
    return g // step


def check_schedule(args, world_size: int) -> None:
    """The batch and learning-rate settings agree (global_batch_tokens divides; min_lr below the peak)."""
    if args.global_batch_tokens is not None:
        steps = accumulation_steps(args, world_size)
        if args.gradient_accumulation_steps not in (1, steps):  # 1 = unset; `steps` = derived already
            raise ValueError(f"give global_batch_tokens or gradient_accumulation_steps, not both (got "
                             f"{args.global_batch_tokens} and {args.gradient_accumulation_steps})")
    if SchedulerType(args.lr_scheduler_type) in MIN_LR_SCHEDULES and "min_lr_rate" not in (
            args.lr_scheduler_kwargs or {}):
        if args.min_lr is None:
            raise ValueError(f"lr_scheduler_type {SchedulerType(args.lr_scheduler_type).value} needs min_lr")
        if args.min_lr > args.learning_rate:
            raise ValueError(f"min_lr {args.min_lr} is above learning_rate {args.learning_rate}")


def resolve_schedule(args) -> None:
    """gradient_accumulation_steps from global_batch_tokens and the world size; min_lr into the scheduler's
    kwargs. Runs where the trainer is built, after every override (idempotent)."""
    world = args.world_size
    check_schedule(args, world)
    if args.global_batch_tokens is not None:
        args.gradient_accumulation_steps = accumulation_steps(args, world)
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if SchedulerType(args.lr_scheduler_type) in MIN_LR_SCHEDULES and "min_lr_rate" not in kwargs:
        args.lr_scheduler_kwargs = {**kwargs, "min_lr": args.min_lr}
