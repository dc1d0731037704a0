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
