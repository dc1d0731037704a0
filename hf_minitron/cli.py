"""`hf-minitron` command line: parse arguments, then call the stage functions. No logic lives here."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser, flag: str = "--teacher", what: str = "teacher") -> None:
    p.add_argument(flag, required=True, help=f"the {what}: a Hub repo id, a local folder, or a .gguf file")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of the model (default: main)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the Hub repo or folder (dequantized on load)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to load weights in (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when available) (default: cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the repo to run (off by default; never needed for supported families)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="text source: local .txt/.jsonl/.json/.parquet/.csv files, folders or globs (comma-separated), "
                        "'pydoc-topics' (CPython's language reference, no download), or a Hub dataset id")
    p.add_argument("--data-config", default=None, help="Hub dataset configuration name")
    p.add_argument("--data-split", default="train", help="dataset split (default: train)")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")


# ---- subcommands owned by the retraining stages (distill, sft) are added below this line ----


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="recover a pruned student by distilling the teacher into it (Minitron KD)",
                       description="Off-policy knowledge distillation on packed plain text, on TRL's SFTTrainer.")
    p.add_argument("--teacher", required=True, help="the teacher: a Hub repo id, a local folder, or a .gguf file")
    p.add_argument("--student", required=True, help="the student (e.g. a pruned model folder): repo id, folder or .gguf")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to load the teacher in (default: its own)")
    p.add_argument("--student-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to load the student in (default: its own)")
    p.add_argument("--teacher-device", default=None, help="device for the teacher (default: the training device)")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="output folder: checkpoints, then the distilled student")
    p.add_argument("--max-tokens", type=int, required=True, help="training token budget (sets the number of steps)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed training window (default: 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per device per micro-batch (default: 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="LR warm-up: a number of steps, or a fraction of all steps when below 1 (default: 0)")
    p.add_argument("--logit-loss", choices=["forward_kl", "reverse_kl", "jsd", "mse", "cosine"], default="forward_kl",
                   help="divergence between next-token distributions (default: forward_kl)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature tau (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="compare only the teacher's K most likely tokens")
    p.add_argument("--jsd-beta", type=float, default=0.5, help="generalized JSD mixture weight (default: 0.5)")
    p.add_argument("--w-logit", type=float, default=1.0, help="weight of the logit loss (default: 1.0)")
    p.add_argument("--w-clm", type=float, default=0.0, help="weight of the cross-entropy with the data (default: 0)")
    p.add_argument("--is-layers", default=None,
                   help="intermediate-state pairs 'teacher:student,...' as hidden-state indices (0 = embeddings, "
                        "i = output of block i); default: none")
    p.add_argument("--is-loss", choices=["mse", "cosine"], default="mse", help="intermediate-state loss (default: mse)")
    p.add_argument("--alpha", type=float, default=None,
                   help="fixed weight of the intermediate-state loss (default: dynamic L_logit / L_is)")
    p.add_argument("--chunk-tokens", type=int, default=1024,
                   help="tokens per chunk of the logit loss; bounds its memory (default: 1024; 0 = no chunking)")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default: 500)")
    p.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default: 10)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute student activations in backward")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    p.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    import json

    from .data import TextSource
    from .distill import distill

    data = TextSource(args.data, config=args.data_config, split=args.data_split, text_column=args.text_column,
                      streaming=args.streaming)
    result = distill(args.teacher, args.student, data, args.out, args.max_tokens, text_column=args.text_column,
                     teacher_dtype=args.teacher_dtype, student_dtype=args.student_dtype,
                     teacher_device=args.teacher_device, resume=args.resume, overwrite=args.overwrite,
                     max_length=args.seq_len, per_device_train_batch_size=args.batch_size,
                     gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                     warmup_steps=args.warmup, logit_loss=args.logit_loss, temperature=args.temperature,
                     top_k=args.top_k, jsd_beta=args.jsd_beta, w_logit=args.w_logit, w_clm=args.w_clm,
                     is_layers=args.is_layers, is_loss=args.is_loss, alpha=args.alpha,
                     kd_chunk_tokens=args.chunk_tokens, save_steps=args.save_steps,
                     logging_steps=args.logging_steps, seed=args.seed,
                     gradient_checkpointing=args.activation_checkpointing, report_to=[])
    print(json.dumps({k: v for k, v in result.items() if k != "log_history"}, indent=1))
    return 0


def _add_sft(sub) -> None:
    p = sub.add_parser("sft", help="make an instruct variant: supervised fine-tuning on chat data (TRL SFTTrainer)",
                       description="SFT with the loss on the assistant answers only; optional LoRA, merged on save.")
    p.add_argument("--model", required=True, help="the model to fine-tune: Hub repo id, local folder or .gguf file")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to load the model in (default: its own)")
    p.add_argument("--data", required=True,
                   help="chat data: .jsonl/.json/.parquet/.csv with 'messages' or 'prompt'+'completion' columns, "
                        "Alpaca seed tasks (.jsonl with 'instruction'+'instances'), or a Hub dataset id")
    p.add_argument("--data-split", default="train", help="Hub dataset split (default: train)")
    p.add_argument("--out", required=True, help="output folder: checkpoints, then the fine-tuned (merged) model")
    p.add_argument("--chat-template", default=None,
                   help="chat template to use instead of the model's: a .jinja file or a tokenizer folder")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the weights on save)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    p.add_argument("--lora-target", default="all-linear", help="modules to adapt (default: all-linear, not lm_head)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default: 3)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--max-length", type=int, default=1024, help="truncate examples to N tokens (default: 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per device per micro-batch (default: 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate (default: 2e-5; ~1e-4 with --lora)")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default: 500)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a model")
    p.set_defaults(func=_run_sft)


def _run_sft(args) -> int:
    import json

    from .sft import sft

    result = sft(args.model, args.data, args.out, chat_template=args.chat_template, lora=args.lora,
                 lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_target=args.lora_target, dtype=args.dtype,
                 split=args.data_split, resume=args.resume, overwrite=args.overwrite,
                 num_train_epochs=args.epochs, max_steps=args.max_steps, max_length=args.max_length,
                 per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                 learning_rate=args.lr, save_steps=args.save_steps, seed=args.seed, report_to=[],
                 gradient_checkpointing=False)
    print(json.dumps({k: v for k, v in result.items() if k != "log_history"}, indent=1))
    return 0


# ---- end of retraining subcommands ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-minitron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"hf-minitron {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
