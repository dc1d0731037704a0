"""Commands on a whole family or run folder: build, search, publish, space."""

from __future__ import annotations

import argparse

from ..publish import PublishConfig
from ..schema import add_flags, given, port_number, writable_folder


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/, e.g. recipes/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. distill.tokens=2M members.small.params=60M (values read as YAML)")
    p.add_argument("--teacher", default=None, help="shortcut for teacher.source=...: Hub repo id, folder or .gguf")
    p.add_argument("--out", default=None, type=writable_folder, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _recipe(args):
    from ..recipe import load_recipe

    overrides = list(args.overrides) + ([f"teacher.source={args.teacher}"] if args.teacher else [])
    recipe = load_recipe(args.recipe, overrides)
    return recipe, args.out or f"runs/{recipe.name}"


def add_commands(sub) -> None:
    p = sub.add_parser("build", help="build a whole family from a recipe, resumably", description="Every stage of "
                       "the recipe into a run folder with a manifest, then the family report and (publish.org) the "
                       "Hub. Running it again skips finished stages and resumes an interrupted one.")
    _add_recipe(p)
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
    p.set_defaults(func=run_build)

    p = sub.add_parser("search", help="architecture search for members with a parameter budget (LoRA-ranked)",
                       description="The build's importance and search stages only; a later `build` reuses them.")
    _add_recipe(p)
    p.add_argument("--member", action="append", default=None,
                   help="search for this member only; repeatable (default: every member with params)")
    p.add_argument("--force", action="store_true", help="redo a search that already finished")
    p.set_defaults(func=run_search)

    p = sub.add_parser("publish", help="push family members to the Hugging Face Hub with generated model cards",
                       description="One model repo per member; only changed files are uploaded, so a rerun completes "
                                   "a part-way publish. The token comes from HF_TOKEN or `hf auth login`.")
    p.add_argument("path", metavar="RUN_OR_FOLDER",
                   help="a member folder (config.json + .safetensors) or a run folder holding member folders")
    p.add_argument("--name", default=None, help="repo name when publishing one member folder (default: its name)")
    add_flags(p, PublishConfig, "publish", required=("org",), title="publishing (recipe section publish:)")
    p.set_defaults(func=run_publish)

    p = sub.add_parser("space", help="compare a family's members side by side in the Gradio app, locally",
                       description="spaces/compare/app.py on a family: answers streamed, latency, tokens/s, eval table,"
                                   " plot; limits: MAX_PROMPT_TOKENS (1024), CONCURRENCY_LIMIT (1), QUEUE_SIZE (32).")
    p.add_argument("source", metavar="RUN_OR_FAMILY_FILE", nargs="+",
                   help="a run folder (member folders, eval JSON and family.png are found in it), a family file "
                        "(.json/.yaml), or member folders / Hub ids")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 to reach it from other machines (default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--name", default=None, help="title of the family (default: the run folder's name)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--write-family", default=None, metavar="FILE",
                   help="also write the family file built from the source to FILE (JSON), to edit or reuse")
    p.set_defaults(func=run_space)


def run_build(args) -> int:
    recipe, out = _recipe(args)
    if args.dry_run:
        from ..cost import describe

        print(describe(recipe))
        return 0
    from ..pipeline import build

    build(recipe, out, force=args.force, members=args.member, progress=not args.quiet)
    return 0


def run_search(args) -> int:
    from ..pipeline import build

    recipe, out = _recipe(args)
    names = args.member or [m.name for m in recipe.members if m.params]
    if not names:
        raise ValueError(f"recipe {args.recipe!r} has no member with a parameter budget (params) to search for")
    build(recipe, out, force=[f"{n}:search" for n in names] if args.force else [], members=names, until="search",
          progress=not args.quiet)
    return 0


def run_publish(args) -> int:
    from ..publish import find_members, publish_member, publish_run

    config = PublishConfig(**given(args, "publish", PublishConfig))
    members = find_members(args.path)
    if len(members) == 1 and not (config.collection or config.space):
        report = publish_member(members[0], f"{config.org}/{args.name or members[0].name}", config=config)
        print(report.line())
        return 0
    if args.name:
        raise ValueError("--name applies to a single member folder; a run publishes each under its own name")
    print(publish_run(args.path, config).summary())
    return 0


def run_space(args) -> int:
    from ..space import build_family, launch_space, write_family_file

    source = args.source if len(args.source) > 1 else args.source[0]
    if args.write_family:
        print(f"family file written to {write_family_file(build_family(source, args.name), args.write_family)}")
    launch_space(source, host=args.host, port=args.port, share=args.share, name=args.name, device=args.device)
    return 0
