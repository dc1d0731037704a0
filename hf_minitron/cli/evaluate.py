"""`hf-minitron eval`: perplexity on any text source and benchmark tasks for one model."""

from __future__ import annotations

import json
import os

from ..evaluate import EvaluateConfig
from ..schema import add_flags, given
from ..data import TextSource
from .args import add_data, add_model, model_args


def add_commands(sub) -> None:
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
    p.add_argument("--out", default=None,
                   help="results JSON to write (default: eval_results.json in the model folder, when it is a folder)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..evaluate import RESULTS_FILE, evaluate_model

    config = EvaluateConfig(**given(args, "evaluate", EvaluateConfig))
    if not (config.tasks or config.choice_files or args.data):
        raise ValueError("nothing to evaluate: give --tasks, --choice-files or --data")
    model_spec = model_args(args, "model")
    if args.out is None and not os.path.isdir(model_spec.source):
        raise ValueError(f"--out is needed when --model ({model_spec.source!r}) is not a local folder")
    config.check()  # bad task names fail before the model loads
    shared = given(args, "data", TextSource)  # --data-split, --text-column, ... for every --data
    sources = [TextSource(path, **shared) for path in args.data]
    model, tokenizer = model_spec.load()
    out = args.out or os.path.join(model_spec.source, RESULTS_FILE)
    result = evaluate_model(model, tokenizer, args.name or os.path.basename(os.path.normpath(model_spec.source)),
                            config, sources, out=out)
    print(json.dumps(result, indent=1))
    return 0
