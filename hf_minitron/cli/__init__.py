"""`hf-minitron` command line. Flags are generated from the stages' configs (`schema.add_flags`), so every flag is
a recipe key of the same name and default; a command only resolves its inputs and calls the stage's entry function.

Modules by meaning: `model` (importance, prune, params, eval: one model), `train` (distill, sft), `family` (build,
search, publish, space: a whole family or run folder); the flags they share are below.
"""

from __future__ import annotations

import argparse
import sys

from ..data import TextSource
from ..models import ModelArgs
from ..schema import add_flags, given, writable_folder


def add_model(p: argparse.ArgumentParser, role: str = "teacher", prefix: str = "", required: bool = True) -> None:
    """`--ROLE` plus ModelArgs' flags (`--revision`, `--gguf-file`, ...; `--PREFIX-revision` with a prefix)."""
    add_flags(p, ModelArgs, role, prefix=prefix, rename={"source": f"--{role}"},
              required=("source",) if required else (), title=f"{role} model")


def model_args(args, role: str = "teacher") -> ModelArgs:
    return ModelArgs(**given(args, role, ModelArgs))


def add_data(p: argparse.ArgumentParser, title: str = "data", required: bool = True, exclude=()) -> None:
    add_flags(p, TextSource, "data", prefix="data", required=("path",) if required else (), exclude=exclude,
              rename={"path": "--data", "text_column": "--text-column", "streaming": "--streaming"}, title=title)


def data_source(args) -> TextSource:
    return TextSource(**given(args, "data", TextSource))


def add_output(p: argparse.ArgumentParser, what: str, resume: bool = False) -> None:
    p.add_argument("--out", required=True, type=writable_folder, help=f"output folder: {what}")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds finished work")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")


def build_parser() -> argparse.ArgumentParser:
    from . import family, model, train

    parser = argparse.ArgumentParser(
        prog="hf-minitron",
        description="Turn one Hugging Face causal LM into a family of smaller ones (Minitron, arXiv 2407.14679): "
                    "importance scoring, pruning, architecture search, distillation, SFT, evaluation, publishing "
                    "and a comparison Space. Each subcommand has its own --help.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (model, train, family):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..publish import PublishError
    from ..ranks import MainProcessError, finish

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args) or 0
        finish()  # every process got here: end an `accelerate launch`'s process group before the interpreter exits
        return code
    except PublishError as e:  # what was and was not pushed, one line per repo
        print(f"hf-minitron {args.command}: publishing did not complete:\n{e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"hf-minitron {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MainProcessError:  # another process of an `accelerate launch`: the main one printed the error
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line, and how to go on (training saved a checkpoint first)
        again = "run the same command again to resume" if args.command == "build" else \
            "add --resume to the same command to continue" if str(e) else "nothing was saved"
        print(f"hf-minitron {args.command}: {e or 'interrupted'}; {again}", file=sys.stderr)
        return 130
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        again = "run the same command again to resume" if args.command == "build" else "run it again"
        print(f"hf-minitron {args.command}: error: disk full ({full}); free space and {again}", file=sys.stderr)
        return 1


DISK_FULL = ("No space left on device", "File too large", "Disk quota exceeded", "os error 27", "os error 28",
             "failed writing file")  # the last: torch.save's PytorchStreamWriter


def _disk_full(e: BaseException) -> str | None:
    """The first line of a full-disk error (an OSError, or one that safetensors or torch.save raise about it), or
    None for any other error."""
    import errno

    while e is not None:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or \
                any(s in text for s in DISK_FULL):
            return text
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
