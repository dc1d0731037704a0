"""`hf-minitron` command line. Flags are generated from the stages' configs (`schema.add_flags`), so every flag is
a recipe key of the same name and default; a command only resolves its inputs and calls the stage's entry function.

Modules by meaning: `model` (importance, prune, params: one model's weights), `train` (distill, sft), `evaluate`
(eval), `family` (build, search, publish, space: a whole family or run folder).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, family, model, train

    parser = argparse.ArgumentParser(
        prog="hf-minitron",
        description="Turn one Hugging Face causal LM into a family of smaller ones (Minitron, arXiv 2407.14679): "
                    "importance scoring, pruning, architecture search, distillation, SFT, evaluation, publishing "
                    "and a comparison Space. Each subcommand has its own --help.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (model, train, family, evaluate):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..publish import PublishError

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
