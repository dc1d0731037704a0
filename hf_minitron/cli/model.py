"""Commands on one model: importance, prune, params, eval."""

from __future__ import annotations

from dataclasses import replace

import json
import os

from ..data import TextSource
from ..evaluate import EvaluateConfig
from ..importance import ImportanceConfig
from ..prune import PruneConfig, PruneTarget
from ..schema import add_flags, given, writable_file
from . import add_data, add_model, add_output, data_source, model_args


def add_commands(sub) -> None:
    p = sub.add_parser("importance", help="score heads, neurons, channels and layers on calibration data",
                       description="Forward passes only. Scores are written once and reused for every prune target.")
    add_model(p)
    add_data(p)
    add_flags(p, ImportanceConfig, "importance", title="importance (recipe section importance:)")
    add_output(p, "the scores (importance.safetensors + importance.json)")
    p.set_defaults(func=run_importance)

    p = sub.add_parser("prune", help="prune the teacher to a target shape using cached importance scores",
                       description="Writes a folder that loads with AutoModelForCausalLM.from_pretrained.")
    add_model(p)
    p.add_argument("--importance", required=True, help="scores folder written by `hf-minitron importance`")
    add_flags(p, PruneTarget, "target", title="target shape (recipe: members.N.shape)")
    add_flags(p, PruneConfig, "prune", title="pruning (recipe section prune:)")
    add_output(p, "the pruned model")
    p.set_defaults(func=run_prune)

    p = sub.add_parser("params", help="exact parameter count of a target shape, from the config alone")
    add_model(p)
    add_flags(p, PruneTarget, "target", title="target shape (recipe: members.N.shape)")
    p.set_defaults(func=run_params)

    p = sub.add_parser("eval", help="evaluate a model: perplexity on any text source, lm-eval benchmark tasks",
                       description="Writes one results JSON (perplexity records and task metrics). Benchmarks run "
                                   "through lm-eval on the loaded model; local multiple-choice JSONL files run as "
                                   "lm-eval custom tasks, offline. Perplexity windows are cut as the build cuts them.")
    add_model(p, "model")
    p.add_argument("--name", default=None, help="name recorded in the results (default: the model folder's name)")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="text source for perplexity: local .txt/.jsonl/.json/.parquet/.csv, 'pydoc-topics', or a Hub "
                        "dataset id; repeatable (the other --data-* flags apply to each)")
    add_data(p, "perplexity data", required=False, exclude=("path",))
    add_flags(p, EvaluateConfig, "evaluate", title="evaluation (recipe section evaluate:)")
    p.add_argument("--out", default=None, type=writable_file,
                   help="results JSON to write (default: eval_results.json in the model folder, when it is a folder)")
    p.set_defaults(func=run_eval)


def run_importance(args) -> None:
    from ..importance import check_output
    from ..importance import run_importance as run
    from ..layerwise import use_layers
    from ..models import load_tokenizer

    check_output(args.out, args.overwrite)
    config = ImportanceConfig(**given(args, "importance", ImportanceConfig))
    teacher = model_args(args)
    source = teacher.resolve()
    if use_layers(config.mode, source):  # a safetensors folder read one layer at a time: never loaded whole
        model, tokenizer = source, load_tokenizer(source, teacher.trust_remote_code)
    else:
        (model, tokenizer), config = teacher.load(source, seq_len=config.seq_len), replace(config, mode="memory")
    run(model, tokenizer, data_source(args), config, args.out, {"teacher": source.record()}, dtype=teacher.dtype,
        device=teacher.device)
    print(f"importance scores written to {args.out}")


def run_prune(args) -> None:
    from ..archs import count_parameters
    from ..models import check_scores_model, load_config, load_tokenizer
    from ..prune import check_output, student_config
    from ..prune import run_prune as run
    from ..prune_stream import use_stream

    check_output(args.out, args.overwrite)
    target = PruneTarget(**given(args, "target", PruneTarget))
    config = PruneConfig(**given(args, "prune", PruneConfig))
    teacher = model_args(args)
    source = teacher.resolve()
    student_config(load_config(source, teacher.trust_remote_code), target)  # impossible targets fail before loading
    check_scores_model(args.importance, source)  # scores of another model (even of the same shape) are refused
    if use_stream(config.mode, source):  # the student written from the teacher's shards: never loaded whole
        model, tokenizer = source, load_tokenizer(source, teacher.trust_remote_code)
    else:
        (model, tokenizer), config = teacher.load(source), replace(config, mode="memory")
    out = run(model, tokenizer, args.importance, target, config, args.out,
              {"teacher": source.as_dict(), "importance": str(args.importance)}, dtype=teacher.dtype)
    teacher_params = count_parameters(load_config(source, teacher.trust_remote_code))
    print(f"pruned model ({out.record['parameters']:,} parameters, teacher {teacher_params:,}) written to {args.out}")


def run_params(args) -> None:
    from ..archs import count_parameters
    from ..models import load_config
    from ..prune import parameter_count

    teacher = model_args(args)
    config = load_config(teacher.resolve(), teacher.trust_remote_code)
    print(f"teacher: {count_parameters(config):,}")
    print(f"target:  {parameter_count(config, PruneTarget(**given(args, 'target', PruneTarget))):,}")


def run_eval(args) -> int:
    from ..evaluate import evaluate_model, results_path

    config = EvaluateConfig(**given(args, "evaluate", EvaluateConfig))
    if not (config.tasks or config.choice_files or args.data):
        raise ValueError("nothing to evaluate: give --tasks, --choice-files or --data")
    config.check()  # bad task names fail before the model loads
    model_spec = model_args(args, "model")
    source = model_spec.resolve()  # a missing path is named here
    out = results_path(args.out, model_spec.source)
    shared = given(args, "data", TextSource)  # --data-split, --text-column, ... for every --data
    sources = [TextSource(path, **shared) for path in args.data]
    model, tokenizer = model_spec.load(source)
    result = evaluate_model(model, tokenizer, args.name or os.path.basename(os.path.normpath(model_spec.source)),
                            config, sources, out=out)
    print(json.dumps(result, indent=1))
    return 0
