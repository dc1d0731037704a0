"""Flags shared by several commands: a model (teacher, student or model), a text source, an output folder."""

from __future__ import annotations

import argparse

from ..data import TextSource
from ..models import ModelArgs
from ..schema import add_flags, given


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
    p.add_argument("--out", required=True, help=f"output folder: {what}")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds finished work")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
