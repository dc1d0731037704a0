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


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_importance(sub) -> None:
    p = sub.add_parser("importance", help="score heads, neurons, channels and layers on calibration data",
                       description="Forward passes only. Scores are written once and reused for every prune target.")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--samples", type=int, default=1024, help="calibration sequences (paper: 1024) (default: 1024)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per calibration sequence (default: 4096)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default: 1)")
    p.add_argument("--batch-agg", choices=["mean", "l2", "var"], default="l2",
                   help="default aggregation over the batch recorded with the scores (all nine pairs are stored; "
                        "prune can pick another) (default: l2)")
    p.add_argument("--seq-agg", choices=["mean", "l2", "var"], default="mean",
                   help="default aggregation over the sequence (default: mean)")
    p.add_argument("--depth-ppl-samples", type=int, default=64,
                   help="sequences used for the perplexity-drop layer metric, one extra pass per layer; 0 disables "
                        "it (default: 64)")
    p.add_argument("--depth-ppl-runs", type=_int_list, default=[1],
                   help="run lengths (comma-separated) for the perplexity-drop metric (default: 1)")
    p.add_argument("--bi-max-run", type=int, default=None,
                   help="longest contiguous run scored by Block Importance (default: half the layers)")
    p.add_argument("--seed", type=int, default=0, help="seed for picking calibration windows (default: 0)")
    p.add_argument("--out", required=True, help="folder to write the scores to (importance.safetensors + .json)")
    p.add_argument("--overwrite", action="store_true", help="replace scores already in --out")
    p.set_defaults(func=_run_importance)


def _run_importance(args) -> None:
    from .importance import ImportanceConfig, run_importance

    config = ImportanceConfig(batch_size=args.batch_size, depth_ppl_samples=args.depth_ppl_samples,
                              depth_ppl_runs=args.depth_ppl_runs, bi_max_run=args.bi_max_run,
                              default_batch_agg=args.batch_agg, default_seq_agg=args.seq_agg)
    run_importance(args.teacher, args.data, args.out, args.samples, args.seq_len, revision=args.revision,
                   gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
                   trust_remote_code=args.trust_remote_code, data_config=args.data_config, data_split=args.data_split,
                   text_column=args.text_column, streaming=args.streaming, seed=args.seed, config=config,
                   overwrite=args.overwrite)
    print(f"importance scores written to {args.out}")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden-size", type=int, default=None, help="target embedding channels (default: keep)")
    p.add_argument("--ffn-size", type=int, default=None, help="target MLP neurons per layer (default: keep)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="target query heads per layer, the same count in every KV group (default: keep)")
    p.add_argument("--num-kv-heads", type=int, default=None,
                   help="target KV heads: keeps whole GQA groups (default: keep, except MHA where it follows heads)")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--num-layers", type=int, default=None,
                       help="target layers: drops the least important by --depth-metric (default: keep)")
    depth.add_argument("--drop-layers", type=_int_list, default=None, help="layers to drop, e.g. 16,17,18")


def _target(args):
    from .prune import PruneTarget

    return PruneTarget(hidden_size=args.hidden_size, ffn_size=args.ffn_size, num_heads=args.num_heads,
                       num_kv_heads=args.num_kv_heads, num_layers=args.num_layers, drop_layers=args.drop_layers)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune the teacher to a target shape using cached importance scores",
                       description="Writes a folder that loads with AutoModelForCausalLM.from_pretrained.")
    _add_model_args(p)
    p.add_argument("--importance", required=True, help="scores folder written by `hf-minitron importance`")
    _add_target_args(p)
    p.add_argument("--batch-agg", choices=["mean", "l2", "var"], default=None,
                   help="aggregation over the batch (default: the one recorded with the scores)")
    p.add_argument("--seq-agg", choices=["mean", "l2", "var"], default=None,
                   help="aggregation over the sequence (default: the one recorded with the scores)")
    p.add_argument("--depth-metric", choices=["ppl", "bi", "bi-run"], default="ppl",
                   help="how --num-layers picks layers: ppl = smallest perplexity increase, bi = lowest Block "
                        "Importance, bi-run = the contiguous run with the lowest BI (default: ppl)")
    p.add_argument("--no-merge-heads", action="store_true",
                   help="drop pruned heads outright instead of merging them into kept heads (paper section 2.3)")
    p.add_argument("--out", required=True, help="output folder for the pruned model")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> None:
    from .prune import PruneOptions, run_prune

    options = PruneOptions(batch_agg=args.batch_agg, seq_agg=args.seq_agg, depth_metric=args.depth_metric,
                           merge_heads=not args.no_merge_heads)
    info = run_prune(args.teacher, args.importance, args.out, _target(args), options, revision=args.revision,
                     gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
                     trust_remote_code=args.trust_remote_code, overwrite=args.overwrite)
    print(f"pruned model ({info['student_parameters']:,} parameters, teacher {info['teacher_parameters']:,}) "
          f"written to {args.out}")


def _add_params(sub) -> None:
    p = sub.add_parser("params", help="exact parameter count of a target shape, from the config alone")
    p.add_argument("--teacher", required=True, help="Hub repo id, local folder or .gguf file (only its config is read)")
    p.add_argument("--revision", default=None, help="Hub revision (default: main)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the repo or folder")
    _add_target_args(p)
    p.set_defaults(func=_run_params)


def _run_params(args) -> None:
    from .archs import count_parameters
    from .models import resolve_source
    from .prune import load_config, parameter_count

    config = load_config(resolve_source(args.teacher, revision=args.revision, gguf_file=args.gguf_file))
    print(f"teacher: {count_parameters(config):,}")
    print(f"target:  {parameter_count(config, _target(args)):,}")


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
    parser = argparse.ArgumentParser(
        prog="hf-minitron",
        description="Turn one Hugging Face causal LM into a family of smaller ones (Minitron, arXiv 2407.14679): "
                    "importance scoring, pruning, architecture search, distillation, SFT, evaluation, publishing "
                    "and a comparison Space. Each subcommand has its own --help.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_importance(sub)
    _add_prune(sub)
    _add_params(sub)
    _add_distill(sub)
    _add_sft(sub)
    from . import cli_family

    for add in (cli_family.add_search, cli_family.add_build, cli_family.add_eval, cli_family.add_publish,
                cli_family.add_space):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .publish import PublishError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except PublishError as e:  # what was and was not pushed, one line per repo
        print(f"hf-minitron {args.command}: publishing did not complete:\n{e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"hf-minitron {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
