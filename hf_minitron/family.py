"""The build's family-level steps, once every member is evaluated: the family report and publishing.

Report: `family/` in the run folder (family_results.json, family.md table, family.png plot, README.md family card,
teacher included so the plot shows where the family started), and a model card (README.md, with the plot) in every
member folder. It is rendered anew on each build (cheap, derived from files already there); a card someone wrote by
hand (without our tag) is left alone.

Publish (when the recipe's `publish.org` is set): every member and the comparison Space through
`publish.publish_run`, as a manifest stage whose inputs are the members' outputs, so a build publishes again only
when a member changed, and a publish that failed part-way is retried by the next build (publishing is idempotent).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from .cards import is_repo_id, read_json, write_family_report, write_member_card
from .cost import account
from .evaluate import RESULTS_FILE
from .publish import card_is_generated
from .rundir import hash_json

FAMILY_DIR = "family"


def member_folders(recipe, run) -> list[tuple[str, Path, object]]:
    """(name, folder, recipe member) of every built member and instruct variant, in recipe order."""
    out = []
    for m in recipe.members:
        for name in [m.name] + ([m.name + "-instruct"] if m.instruct else []):
            folder = run.member(name)
            if (folder / "config.json").is_file():
                out.append((name, folder, m))
    return out


def card_fields(recipe, run, folders) -> dict[str, dict]:
    """{name: what the build knows that a member folder does not}: teacher, data sets, from-scratch tokens, the
    tokens of the member's whole line, the recipe. The cost accounting and the recipe are read once for all."""
    sources = [s for s in (recipe.data.calibration, recipe.data.distillation, recipe.data.sft) if s is not None]
    datasets = sorted({s.path for s in sources if is_repo_id(s.path)})
    recipe_file = run.root / "recipe.yaml"
    recipe_text = recipe_file.read_text() if recipe_file.is_file() else None
    costs = account(run, recipe)["members"]
    fields = {}
    for name, _, m in folders:
        cost = costs.get(m.name, {})
        # the base variant did not use the SFT tokens that its instruct sibling did
        sft = 0 if name != m.name else cost.get("tokens", {}).get("sft", 0)
        fields[name] = {"teacher": recipe.teacher.source, "datasets": datasets,
                        "scratch_tokens": m.scratch_tokens or recipe.cost.scratch_tokens,
                        "lineage_tokens": cost.get("lineage_tokens", 0) - sft or None, "recipe": recipe_text}
    return fields


def report_family(recipe, run, log=print) -> Path | None:
    """family/ (results, table, plot, card) and each member's card; None when no member has results yet."""
    folders = member_folders(recipe, run)
    results = [r for r in [read_json(run.root / "eval" / "teacher.json")] +
               [read_json(f / RESULTS_FILE) for _, f, _ in folders] if r]
    if not any(r.get("model") != "teacher" for r in results):
        return None
    fields = card_fields(recipe, run, folders)
    out = run.root / FAMILY_DIR
    paths = write_family_report(results, out, recipe.name, teacher="teacher",
                                members={n: f"../{n}" for n, _, _ in folders},
                                recipe=next(iter(fields.values()))["recipe"])
    for name, folder, _ in folders:
        shutil.copy2(paths["plot"], folder / paths["plot"].name)
        if card_is_generated(folder):
            write_member_card(folder, **fields[name], plot=paths["plot"].name)
    log(f"family report: {paths['table']} , {paths['plot']}; a model card in each member folder")
    return out


def publish_stage(recipe, run, log=print) -> None:
    """Push the members (and the Space, `publish.space`) to `publish.org`, once per change of the members."""
    from .publish import publish_run

    p = recipe.publish
    folders = member_folders(recipe, run)
    parents = {name: run.output_hash(f"{m.name}/{'distill' if name == m.name else 'sft'}") for name, _, m in folders}

    def fn(action):
        report = publish_run(run.root, p.org, private=p.private, collection=p.collection, space=p.space,
                             name=recipe.name, member_card_fields=card_fields(recipe, run, folders))
        log(report.summary())
        pushed = {m.repo_id: m.commit for m in report.members}
        if report.space:
            pushed[report.space.repo_id] = report.space.commit
        return None, hash_json(pushed), {}, {"repos": pushed}

    run.stage("publish", asdict(p), parents, fn, log=log)
