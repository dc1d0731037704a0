"""Commands on a whole family or run folder: build, search, publish, space."""

from __future__ import annotations

import argparse

from ..publish import PublishConfig
from ..schema import add_flags, given, port_number, writable_folder


def _add_recipe(p: argparse.ArgumentParser, derive: bool = False) -> None:
    p.add_argument("--recipe", required=not derive, help="recipe YAML (see recipes/, e.g. recipes/quickstart.yaml)"
                   + ("; without it, one is derived from --teacher and written to RUN/recipe.yaml" if derive else ""))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. distill.tokens=2M members.small.params=60M (values read as YAML)")
    p.add_argument("--teacher", default=None, help="shortcut for teacher.source=...: Hub repo id, folder or .gguf")
    p.add_argument("--out", default=None, type=writable_folder, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if not derive:
        return
    g = p.add_argument_group("without --recipe (derived from the teacher: hf_minitron/derive.py)")
    g.add_argument("--revision", default=None, help="the teacher's Hub branch, tag or commit (teacher.revision)")
    g.add_argument("--gguf-file", default=None, help="GGUF file inside the teacher's repo or folder")
    g.add_argument("--data", default=None, help="text for calibration, distillation and evaluation (local files, a "
                   "Hub dataset id or pydoc-topics; default: FineWeb-Edu streamed, WikiText-2 for evaluation)")
    g.add_argument("--sizes", default=None, help="member sizes, largest first, each pruned from the previous: shares "
                   "of the teacher (50%%,25%%, the default) or parameter counts (4B,2B)")
    g.add_argument("--tokens", default=None, help="distillation tokens per member, e.g. 2B (default: about 11 per "
                   "parameter of the member, as Minitron 8B's 94B)")
    g.add_argument("--sft-data", default=None, help="chat data for an instruct variant of each member (needs a "
                   "teacher with a chat template)")


DERIVE_FLAGS = ("data", "sizes", "tokens", "sft_data")


def _recipe(args):
    from ..recipe import load_recipe

    teacher = {"source": args.teacher, "revision": getattr(args, "revision", None),
               "gguf_file": getattr(args, "gguf_file", None)}
    if args.recipe:
        extra = [f"--{k.replace('_', '-')}" for k in DERIVE_FLAGS if getattr(args, k, None) is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)}: only without --recipe (the recipe sets these; override its keys, "
                             "e.g. distill.tokens=2M)")
        overrides = list(args.overrides) + [f"teacher.{k}={v}" for k, v in teacher.items() if v]
        recipe = load_recipe(args.recipe, overrides)
        return recipe, args.out or f"runs/{recipe.name}"
    if not args.teacher:
        raise ValueError("give --teacher (a recipe is derived from it) or --recipe")
    from ..derive import derive_recipe, derived_note, write_derived
    from ..models import TeacherArgs

    recipe = derive_recipe(TeacherArgs(**teacher), data=args.data, sizes=args.sizes, tokens=args.tokens,
                           sft_data=args.sft_data, overrides=args.overrides)
    out = args.out or f"runs/{recipe.name}"
    print(f"derived recipe written to {write_derived(recipe, out)} (edit it, then `hf-minitron build --recipe "
          f"{out}/recipe.yaml --out {out}`)\n{derived_note(recipe)}")
    return recipe, out


def add_commands(sub) -> None:
    p = sub.add_parser("build", help="build a whole family from a teacher (or a recipe), resumably",
                       description="`build --teacher T` derives a recipe (RUN/recipe.yaml) from the teacher's config "
                       "and the paper's defaults; `build --recipe R` runs a recipe. Every stage into a run folder "
                       "with a manifest, then the family report and (publish.org) the Hub, after a plan printed before "
                       "any weights load. Running it again skips finished stages and resumes an interrupted one.")
    _add_recipe(p, derive=True)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a finished stage (the stages after it follow when its output changes): importance, "
                        "search, prune, distill, sft or evaluate, for every member, or MEMBER:STAGE for one; "
                        "or publish (the family, when the recipe sets publish.org); also allows a changed recipe "
                        "setting for that stage; repeatable")
    p.add_argument("--member", action="append", default=None,
                   help="build only this member (and its parents); repeatable (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (every build prints it first: members, shapes or search candidates, "
                        "parameters, tokens, FLOPs, disk, estimated time) and stop; no weights are loaded")
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
        from ..plan import print_plan

        print_plan(recipe)
        return 0
    from tqdm.auto import tqdm

    from ..pipeline import build

    build(recipe, out, force=args.force, members=args.member, progress=not args.quiet, log=tqdm.write)
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
