"""`hf-minitron` subcommands for whole families: build, search, eval, publish, space. Parse, then call."""

from __future__ import annotations

import argparse

from .cli import _add_model_args


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


def add_build(sub) -> None:
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


def add_search(sub) -> None:
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


def add_eval(sub) -> None:
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


def add_publish(sub) -> None:
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


def add_space(sub) -> None:
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


