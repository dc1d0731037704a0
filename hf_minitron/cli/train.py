"""Retraining commands: distill (Minitron KD into a pruned student) and sft (an instruct variant)."""

from __future__ import annotations

import json

from ..schema import add_flags, given
from . import add_data, add_model, add_output, data_source, model_args


def _trainer_flags(p, cls, section: str, exclude) -> None:
    """The config's own fields first, then TRL's and the Trainer's, each group under its title."""
    from transformers import TrainingArguments
    from trl import SFTConfig

    ours = [c for c in cls.__mro__ if issubclass(c, SFTConfig) and c is not SFTConfig]  # cls and its shared bases
    own = [n for n in cls.__dataclass_fields__ if any(n in vars(c).get("__annotations__", {}) for c in ours)]
    trl_own = [n for n in SFTConfig.__dataclass_fields__ if n not in TrainingArguments.__dataclass_fields__]
    groups = ((f"{section} ({cls.__name__}, recipe section {section}:)", own),
              ("TRL SFTConfig", [n for n in trl_own if n not in own]),
              ("transformers TrainingArguments", [n for n in TrainingArguments.__dataclass_fields__ if n not in own]))
    every = set(cls.__dataclass_fields__)
    for title, names in groups:
        add_flags(p, cls, section, exclude=(*exclude, *(every - set(names))), title=title)


def add_commands(sub) -> None:
    from ..distill import EXCLUDED as DISTILL_EXCLUDED
    from ..distill import DistillConfig
    from ..sft import EXCLUDED as SFT_EXCLUDED
    from ..sft import InstructConfig
    from ..teacher_cache import TeacherCacheConfig

    p = sub.add_parser("distill", help="recover a pruned student by distilling the teacher into it (Minitron KD)",
                       description="Off-policy knowledge distillation on packed plain text, on TRL's SFTTrainer. "
                                   "Every DistillConfig field is a flag of the same name as its recipe key. "
                                   "With --teacher-cache, --teacher and --data are optional (checked when given).")
    add_model(p, "teacher", required=False)
    add_model(p, "student", prefix="student")
    add_data(p, required=False)
    add_output(p, "checkpoints, then the distilled student", resume=True)
    _trainer_flags(p, DistillConfig, "distill", DISTILL_EXCLUDED)
    p.set_defaults(func=run_distill)

    p = sub.add_parser("teacher-logits", help="run the teacher once over the distillation windows and cache its top-K "
                                              "log-probs, for distill --teacher-cache",
                       description="Writes teacher_cache.json and Arrow shards (datasets.Dataset.from_file). An "
                                   "interrupted run with the same inputs resumes at its first missing shard.")
    add_model(p, "teacher")
    add_data(p)
    add_output(p, "the cache (teacher_cache.json + shard-*.arrow)")
    add_flags(p, TeacherCacheConfig, "teacher_cache", title="teacher cache (TeacherCacheConfig)")
    p.set_defaults(func=run_teacher_logits)

    p = sub.add_parser("sft", help="make an instruct variant: supervised fine-tuning on chat data (TRL SFTTrainer)",
                       description="SFT with the loss on the assistant answers only; LoRA by default, merged on save.")
    add_model(p, "model")
    add_data(p, "chat data: .jsonl/.json/.parquet/.csv with 'messages' or 'prompt'+'completion' columns, Alpaca "
                "seed tasks (instruction + instances), or a Hub dataset id")
    add_output(p, "checkpoints, then the fine-tuned (merged) model", resume=True)
    _trainer_flags(p, InstructConfig, "sft", SFT_EXCLUDED)
    p.set_defaults(func=run_sft)


def run_distill(args) -> int:
    from ..distill import DistillConfig, distill

    config = DistillConfig(output_dir=args.out, **given(args, "distill", DistillConfig))
    teacher, student = model_args(args, "teacher"), model_args(args, "student")
    if config.teacher_cache:  # the teacher is never loaded: only its files are compared with the cache's
        data = data_source(args) if "path" in given(args, "data") else None
        s_model, s_tok = student.load()
        result = distill(teacher.resolve() if teacher.source else None, s_model, data, args.out, config=config,
                         tokenizer=s_tok, text_column=data.text_column if data else "text", resume=args.resume,
                         overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in result.items() if k != "log_history"}, indent=1))
        return 0
    if "path" not in given(args, "data"):
        raise ValueError("no data: give --data (or --teacher-cache)")
    data = data_source(args)
    if "device" not in given(args, "teacher"):  # unless told otherwise, the teacher runs where training does
        teacher.device = str(config.device)
    t_model, t_tok = teacher.load()
    s_model, s_tok = student.load(seq_len=config.max_length)
    result = distill(t_model, s_model, data, args.out, config=config, tokenizer=s_tok, teacher_tokenizer=t_tok,
                     text_column=data.text_column, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in result.items() if k != "log_history"}, indent=1))
    return 0


def run_teacher_logits(args) -> int:
    import shutil

    from ..teacher_cache import TeacherCacheConfig, teacher_identity, write_teacher_cache

    config = TeacherCacheConfig(**given(args, "teacher_cache", TeacherCacheConfig))
    data, teacher = data_source(args), model_args(args, "teacher")
    source = teacher.resolve()
    if args.overwrite:
        shutil.rmtree(args.out, ignore_errors=True)
    if "device" not in given(args, "teacher"):  # under `accelerate launch`, each process on its own device
        from accelerate import PartialState

        teacher.device = str(PartialState().device)
    model, tokenizer = teacher.load(source, seq_len=config.seq_len)
    meta = write_teacher_cache(model, tokenizer, data, args.out, config, text_column=data.text_column,
                               identity=teacher_identity(source))
    keys = ("windows", "tokens", "top_k", "top_p", "seq_len", "id_dtype", "logprob_dtype", "bytes", "bytes_per_token")
    print(json.dumps({"out": args.out, **{k: meta[k] for k in keys}}, indent=1))
    return 0


def run_sft(args) -> int:
    from ..sft import InstructConfig, sft

    config = InstructConfig(output_dir=args.out, **given(args, "sft", InstructConfig))
    model, tokenizer = model_args(args, "model").load()
    result = sft(model, data_source(args), args.out, tokenizer=tokenizer, config=config, resume=args.resume,
                 overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in result.items() if k != "log_history"}, indent=1))
    return 0
