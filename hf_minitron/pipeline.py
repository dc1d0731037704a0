"""The build: one recipe in, one family of members out, resumable at any point.

importance of the teacher (once, cached) -> per member: search (when it gives a parameter budget) -> prune ->
distill -> optional SFT -> evaluate -> member folder; then the family report and, when the recipe asks, publishing
(report.py). A member with `parent` is pruned from its parent's distilled weights (importance is then computed once
on the parent) and distilled from the configured teacher, the parent by default: the paper's 15B -> 8B -> 4B path.

Each stage (build_stages.py) calls the same entry function as its CLI command (`run_importance`, `run_search`,
`run_prune`, `distill`, `sft`, `evaluate_model`) with the recipe section as its config, inside `RunDir.stage`:
re-running skips finished stages and resumes an interrupted one (distillation and SFT from their last checkpoint).
Every stage records its tokens and FLOPs in the manifest; `cost.py` adds them up per member against training it
from scratch.

Run: `hf-minitron build --recipe recipes/quickstart.yaml [--teacher T] [--out RUN] [--force STAGE] [key=value ...]`.
Under `accelerate launch --num_processes N -m hf_minitron.cli build ...` every process runs the build: the training
and the teacher's passes are split across them, everything written to the run folder is written by the main process
(ranks.py), and the plan and progress lines are printed once.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from . import ranks
from .build_stages import (Build, distill_stage, evaluate_stage, importance_stage, member_loader, prune_stage,
                           search_stage, sft_stage, teacher_logits_stage)
from .cost import account, si, summary
from .recipe import MemberSection, Recipe
from .rundir import EVAL_FILE, INSTRUCT_SUFFIX, TEACHER, open_run

STAGES = ("importance", "teacher-logits", "search", "prune", "distill", "sft", "evaluate", "publish")


def _check_positions(r: Recipe, config) -> None:
    """A one-line warning, before any work, for each sequence length of the recipe beyond the teacher's positions
    (the members keep the teacher's positions)."""
    from .distill import DistillConfig
    from .models import check_positions

    distill = r.distill.get("max_length", DistillConfig.__dataclass_fields__["max_length"].default)
    lengths = {"importance.seq_len": r.importance.seq_len, "distill.max_length": distill,
               "evaluate.seq_len": r.evaluate.seq_len}
    if any(m.params for m in r.members):
        lengths.update({"search.seq_len": r.search.seq_len, "search.eval_seq_len": r.search.eval_seq_len})
    for what, n in lengths.items():
        check_positions(config, n, what)


def build_member(b: Build, m: MemberSection, until: str | None = None) -> None:
    """search -> prune -> distill -> SFT -> evaluate for one member, each stage skipped when already done."""
    scores = importance_stage(b, m.base)
    cache, shared = teacher_logits_stage(b, m)
    shape = search_stage(b, m, scores, cache if shared else None) if m.params else asdict(m.shape)
    if until == "search":
        return
    prune_stage(b, m, shape, scores)
    distill_stage(b, m, shape, cache)
    folder = b.run.member(m.name)
    models = [(m.name, member_loader(b, folder), folder / EVAL_FILE)]
    parents = {"distill": b.run.output_hash(f"{m.name}/distill")}
    if m.instruct:
        sft_stage(b, m)
        instruct = b.run.member(m.name + INSTRUCT_SUFFIX)
        models.append((instruct.name, member_loader(b, instruct), instruct / EVAL_FILE))
        parents["sft"] = b.run.output_hash(f"{m.name}/sft")
    evaluate_stage(b, f"{m.name}/evaluate", models, parents)


def _with_ancestors(recipe: Recipe, names) -> list[str]:
    wanted = set()
    for name in names:
        m = recipe.member(name)
        while m is not None:
            wanted.add(m.name)
            m = recipe.member(m.parent) if m.parent else None
    return [m.name for m in recipe.members if m.name in wanted]


def _release(b: Build, remaining) -> None:
    """Drop cached models no remaining member prunes from or distils from (a 15B teacher need not stay for the 4B)."""
    needed = {ref for m in remaining for ref in (m.base, m.kd_teacher)}
    for ref in [r for r in b.models if r not in needed]:
        del b.models[ref]


def build(recipe: Recipe, out: str | Path, force: list[str] = (), members: list[str] | None = None,
          until: str | None = None, progress: bool = True, log=print, plan: bool = True) -> dict:
    """Build (or finish building) the recipe's family into the run folder `out`; returns the cost record.

    `force`: stages to redo, `stage` or `member:stage` (their downstream stages follow). `members`: build only
    these (and their ancestors). `until='search'`: stop the named members after their search stage. `plan`: print
    the plan (plan.py: stages, sizes, FLOPs, disk, estimated time) before any weights load.
    """
    for f in force:
        stage = f.rpartition(":")[2]
        if stage not in STAGES:
            raise ValueError(f"--force {f!r}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    ranks.start()  # every process of an `accelerate launch`, or this one alone
    log, progress = ranks.main_log(log), progress and ranks.is_main()
    source = ranks.main_first(recipe.teacher.resolve)  # a Hub teacher is downloaded once
    teacher_config = recipe.teacher.model_config(source)
    if ranks.is_main():
        _check_positions(recipe, teacher_config)
    if plan:  # before any weights load
        from .plan import print_plan

        print_plan(recipe, log, config=teacher_config)
    with open_run(out, recipe, source.as_dict(), force) as run:
        b = Build(recipe, run, source, teacher_config, progress, log)
        started = time.time()
        names = _with_ancestors(recipe, members) if members else [m.name for m in recipe.members]
        targets = set(members or names)
        if recipe.evaluate.teacher and until is None:
            teacher = (TEACHER, lambda: (b.model(TEACHER), b.tokenizer()), run.teacher_eval())
            evaluate_stage(b, f"{TEACHER}/evaluate", [teacher], {TEACHER: b.identity(TEACHER)})
        for i, name in enumerate(names):
            m = recipe.member(name)
            _release(b, [recipe.member(n) for n in names[i:]])
            log(f"== member {name} ({'budget ' + si(m.params) if m.params else 'explicit shape'}"
                f"{', from ' + m.parent if m.parent else ''})")
            build_member(b, m, until if name in targets else None)
        if until is None:
            from .report import publish_stage, report_family

            ranks.on_main(report_family, recipe, run, log)
            if recipe.publish.org:
                publish_stage(recipe, run, log)
        cost = account(run, recipe)
        run.manifest["cost"] = cost
        run.manifest["members"] = cost["members"]
        run.manifest["builds"].append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "seconds": round(time.time() - started), "actions": run.actions})
        run.save()
        if until is None:
            log(summary(run, recipe, cost, b.params_of(TEACHER)))
            log(f"run folder: {run.root}\nfamily card: {run.family() / 'README.md'}\ncompare the members side by "
                f"side: hf-minitron space {run.root}")
        return {**cost, "actions": run.actions, "run": str(run.root)}
