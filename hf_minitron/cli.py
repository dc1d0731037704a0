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


# ---- subcommands owned by the family builder (build, search) are added below this line ----


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/, e.g. recipes/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. distill.tokens=2M members.small.params=60M (values read as YAML)")
    p.add_argument("--teacher", default=None, help="shortcut for teacher.source=...: Hub repo id, folder or .gguf")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_recipe_args(args):
    from .recipe import load_recipe

    overrides = list(args.overrides) + ([f"teacher.source={args.teacher}"] if args.teacher else [])
    recipe = load_recipe(args.recipe, overrides)
    return recipe, args.out or f"runs/{recipe.name}"


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build a whole family from a recipe: importance, search, prune, distill, SFT, "
                                     "evaluate, family report, publish; resumable",
                       description="Runs every stage of the recipe into a run folder with a manifest, then writes the "
                                   "family report (family/: table, plot, card; a model card per member) and, when "
                                   "the recipe sets publish.org, pushes the members (and publish.space) to the Hub. "
                                   "Running it again skips finished stages and resumes an interrupted one.")
    _add_recipe_args(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a finished stage (the stages after it follow when its output changes): importance, "
                        "search, prune, distill, sft or evaluate, for every member, or MEMBER:STAGE for one; "
                        "or publish (the family, when the recipe sets publish.org); also allows a changed recipe "
                        "setting for that stage; repeatable")
    p.add_argument("--member", action="append", default=None,
                   help="build only this member (and its parents); repeatable (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and print each member's parameter count or search candidates; no "
                        "weights are loaded")
    p.set_defaults(func=_run_build)


def _run_build(args) -> int:
    recipe, out = _load_recipe_args(args)
    if args.dry_run:
        from .cost import describe

        print(describe(recipe))
        return 0
    from .pipeline import build

    build(recipe, out, force=args.force, members=args.member, progress=not args.quiet)
    return 0


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="architecture search for members with a parameter budget (LoRA-ranked)",
                       description="The build's importance and search stages only, in the same run folder: a later "
                                   "`build` reuses them. Writes search.json and search.md per member.")
    _add_recipe_args(p)
    p.add_argument("--member", action="append", default=None,
                   help="search for this member only; repeatable (default: every member with params)")
    p.add_argument("--force", action="store_true", help="redo a search that already finished")
    p.set_defaults(func=_run_search)


def _run_search(args) -> int:
    from .pipeline import build

    recipe, out = _load_recipe_args(args)
    names = args.member or [m.name for m in recipe.members if m.params]
    if not names:
        raise ValueError(f"recipe {args.recipe!r} has no member with a parameter budget (params) to search for")
    build(recipe, out, force=[f"{n}:search" for n in names] if args.force else [], members=names, until="search",
          progress=not args.quiet)
    return 0

# ---- end of family builder subcommands ----


# ---- subcommands owned by evaluation and publishing ----


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity on any text source, lm-eval benchmark tasks",
                       description="Writes one results JSON (perplexity records and task metrics). Benchmarks run "
                                   "through lm-eval on the loaded model; local multiple-choice JSONL files run as "
                                   "lm-eval custom tasks, offline.")
    _add_model_args(p, "--model", "model")
    p.add_argument("--name", default=None, help="name recorded in the results (default: the model folder's name)")
    p.add_argument("--tasks", default=None,
                   help="lm-eval tasks, comma-separated, each optionally name:shots; 'paper' = MMLU 5-shot, HellaSwag "
                        "10, Winogrande 5, ARC-Challenge 25, TruthfulQA MC2 0, GSM8K 5; 'code' = HumanEval, MBPP "
                        "(needs the task data sets: online or in the HF cache) (default: none)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="let code tasks (humaneval, mbpp) execute the generated programs")
    p.add_argument("--hellaswag-file", action="append", default=[],
                   help="local multiple-choice JSONL in HellaSwag layout (ctx, endings, label), scored 0-shot by "
                        "log-likelihood (acc, acc_norm); repeatable")
    p.add_argument("--context-column", default="ctx", help="context column of --hellaswag-file (default: ctx)")
    p.add_argument("--choices-column", default="endings", help="choices column of --hellaswag-file (default: endings)")
    p.add_argument("--label-column", default="label", help="label column of --hellaswag-file (default: label)")
    p.add_argument("--ppl-data", action="append", default=[],
                   help="text source for perplexity: local .txt/.jsonl/.json/.parquet/.csv, 'pydoc-topics', or a Hub "
                        "dataset id; repeatable")
    p.add_argument("--ppl-config", default=None, help="Hub dataset configuration of --ppl-data")
    p.add_argument("--ppl-split", default="train", help="dataset split of --ppl-data (default: train)")
    p.add_argument("--ppl-text-column", default="text", help="text column of --ppl-data (default: text)")
    p.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")
    p.add_argument("--ppl-windows", type=int, default=16,
                   help="windows to score; 0 = the whole source (default: 16)")
    p.add_argument("--ppl-stride", type=int, default=None,
                   help="move windows by this many tokens, scoring only new ones, so each token has more context "
                        "(default: --ppl-seq-len, non-overlapping windows)")
    p.add_argument("--out", default=None,
                   help="results JSON to write (default: eval_results.json in the model folder, when it is a folder)")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import json
    import os

    from .data import TextSource
    from .evaluate import LocalChoiceTask, evaluate_member

    if not (args.tasks or args.hellaswag_file or args.ppl_data):
        raise ValueError("nothing to evaluate: give --tasks, --hellaswag-file or --ppl-data")
    if args.out is None and not os.path.isdir(args.model):
        raise ValueError(f"--out is needed when --model ({args.model!r}) is not a local folder")
    local = [LocalChoiceTask(f, context_column=args.context_column, choices_column=args.choices_column,
                             label_column=args.label_column) for f in args.hellaswag_file]
    sources = [TextSource(d, config=args.ppl_config, split=args.ppl_split, text_column=args.ppl_text_column)
               for d in args.ppl_data]
    result = evaluate_member(args.model, args.out, name=args.name, dtype=args.dtype, device=args.device,
                             revision=args.revision, gguf_file=args.gguf_file,
                             trust_remote_code=args.trust_remote_code, tasks=args.tasks, local_tasks=local,
                             ppl_data=sources, ppl_seq_len=args.ppl_seq_len, ppl_windows=args.ppl_windows or None,
                             ppl_stride=args.ppl_stride, limit=args.limit, batch_size=args.batch_size,
                             allow_code_execution=args.allow_code_execution)
    print(json.dumps(result, indent=1))
    return 0


def _add_publish(sub) -> None:
    p = sub.add_parser("publish", help="push family members to the Hugging Face Hub with generated model cards",
                       description="One model repo per member (ORG/<member folder name>); only changed files are "
                                   "uploaded, so running it again completes a publish that failed part-way. The "
                                   "token comes from HF_TOKEN or `hf auth login`.")
    p.add_argument("path", metavar="RUN_OR_FOLDER",
                   help="a member folder (config.json + .safetensors) or a run folder holding member folders")
    p.add_argument("--org", required=True, help="Hub user or organization to publish under")
    p.add_argument("--name", default=None, help="repo name when publishing one member folder (default: its name)")
    p.add_argument("--private", action="store_true", help="create the repos (and collection) private")
    p.add_argument("--revision", default=None, help="branch to push to, created from main if missing (default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--collection", default=None, help="also add the members to a collection with this title")
    p.add_argument("--space", default=None, metavar="NAME",
                   help="also push the family comparison Space (spaces/compare) as ORG/NAME, its family file "
                        "pointing at the member repos just published (default: no Space)")
    p.add_argument("--extra-file", action="append", default=[],
                   help="file uploaded into every member repo, e.g. the family plot; repeatable")
    p.add_argument("--base-model", default=None,
                   help="Hub id of the teacher for the cards' base_model, when it was loaded from a local file")
    p.add_argument("--license", default=None, help="license for the cards (default: the teacher card's)")
    p.add_argument("--no-card", action="store_true", help="upload README.md as it is instead of rendering the card")
    p.add_argument("--endpoint", default=None, help="Hub address (default: HF_ENDPOINT or https://huggingface.co)")
    p.set_defaults(func=_run_publish)


def _run_publish(args) -> int:
    from .publish import PublishError, find_members, publish_member, publish_run

    members = find_members(args.path)
    fields = {"base_model": args.base_model, "license": args.license}
    try:
        if len(members) == 1 and not (args.collection or args.space):
            report = publish_member(members[0], f"{args.org}/{args.name or members[0].name}", private=args.private,
                                    revision=args.revision, create_pr=args.create_pr, endpoint=args.endpoint,
                                    extra_files=args.extra_file, card=not args.no_card, card_fields=fields)
            print(report.line())
        else:
            if args.name:
                raise ValueError("--name applies to a single member folder; a run publishes each under its own name")
            print(publish_run(args.path, args.org, private=args.private, revision=args.revision,
                              create_pr=args.create_pr, endpoint=args.endpoint, collection=args.collection,
                              space=args.space, extra_files=args.extra_file, card_fields=fields,
                              card=not args.no_card).summary())
    except PublishError as e:
        print(str(e))
        return 1
    return 0


# ---- end of evaluation and publishing subcommands ----


# ---- subcommands owned by the Space ----


def _add_space(sub) -> None:
    p = sub.add_parser("space", help="compare a family's members side by side in the Gradio app, locally",
                       description="Launches spaces/compare/app.py on a family: one prompt, each picked member "
                                   "streaming its answer with latency and tokens/s, and the evaluation table and "
                                   "plot. Models load on first use.")
    p.add_argument("source", metavar="RUN_OR_FAMILY_FILE", nargs="+",
                   help="a run folder (member folders, eval JSON and family.png are found in it), a family file "
                        "(.json/.yaml), or member folders / Hub ids")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 to reach it from other machines (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--name", default=None, help="title of the family (default: the run folder's name)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--write-family", default=None, metavar="FILE",
                   help="also write the family file built from the source to FILE (JSON), to edit or reuse")
    p.set_defaults(func=_run_space)


def _run_space(args) -> int:
    from .space import build_family, launch_space, write_family_file

    source = args.source if len(args.source) > 1 else args.source[0]
    if args.write_family:
        print(f"family file written to {write_family_file(build_family(source, args.name), args.write_family)}")
    launch_space(source, host=args.host, port=args.port, share=args.share, name=args.name, device=args.device)
    return 0


# ---- end of Space subcommands ----


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
    _add_search(sub)
    _add_build(sub)
    _add_eval(sub)
    _add_publish(sub)
    _add_space(sub)
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
