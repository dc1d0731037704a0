"""The family report of a build, once every member is evaluated, and the publish stage after it.

Report: `family/` in the run folder (family_results.json, family.md table, family.png plot, README.md family card,
teacher included so the plot shows where the family started), and a model card (README.md, with the plot) in every
member folder. It is rendered anew on each build (cheap, derived from files already there); a card someone wrote by
hand (without our tag) is left alone. The table, plot and family card also work on any list of results records.

Publish (when the recipe's `publish.org` is set): every member and the comparison Space through
`publish.publish_run`, as a manifest stage whose inputs are the members' outputs, so a build publishes again only
when a member changed, and a publish that failed part-way is retried by the next build (publishing is idempotent).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from .cards import TAGS, CardError, is_repo_id, template_env, write_member_card
from .cost import account
from .evaluate import primary_metric
from .publish import card_is_generated, publish_run
from .rundir import (CARD_FILE, CONFIG_FILE, DISTILL_FILE, EVAL_FILE, FAMILY_PLOT, FAMILY_RESULTS_FILE,
                     FAMILY_TABLE_FILE, INSTRUCT_SUFFIX, RECIPE_FILE, RECOVERY_PLOT, TEACHER, StageOutput, hash_json)
from .utils import read_json, si

# ---- the family: table, plot, card ----


def family_rows(results: list[dict]) -> tuple[list[str], list[dict]]:
    """Columns (one primary metric per task, perplexity first) and one row per member, largest first."""
    columns: list[str] = []
    rows = []
    for res in sorted(results, key=lambda r: -(r.get("parameters") or 0)):
        row = {"model": res.get("model", "?"), "parameters": res.get("parameters"), "values": {}}
        for ppl in res.get("perplexity", []):
            row["values"][f"ppl {Path(str(ppl['data'])).stem}"] = ppl["perplexity"]
        for task, tres in res.get("tasks", {}).items():
            found = primary_metric(tres)
            if found:
                row["values"][f"{task} {found[0]}"] = found[1]
        columns += [c for c in row["values"] if c not in columns]
        rows.append(row)
    return columns, rows


def family_table(results: list[dict]) -> str:
    """A markdown table: member, parameters, share of the largest, one column per metric."""
    columns, rows = family_rows(results)
    if not rows:
        raise CardError("no evaluation results to tabulate")
    top = rows[0]["parameters"] or 1
    lines = ["| model | parameters | size | " + " | ".join(columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for row in rows:
        values = [f"{row['values'][c]:.4g}" if c in row["values"] else "–" for c in columns]
        share = f"{100 * (row['parameters'] or 0) / top:.0f}%"
        lines.append(f"| {row['model']} | {si(row['parameters'], '?')} | {share} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot_family(results: list[dict], out: str | Path, teacher: str | None = None, title: str | None = None) -> Path:
    """PNG with one panel per metric: value vs parameters, every member labelled, the teacher drawn as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    columns, rows = family_rows(results)
    if not columns:
        raise CardError("no metrics to plot")
    teacher = teacher or rows[0]["model"]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], columns):
        points = [(r["parameters"] / 1e6, r["values"][column], r["model"]) for r in rows if column in r["values"]]
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", color="0.75", zorder=1)
        for x, y, name in points:
            is_teacher = name == teacher
            ax.scatter([x], [y], marker="*" if is_teacher else "o", s=140 if is_teacher else 40,
                       color="tab:red" if is_teacher else "tab:blue", zorder=2)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.margins(x=0.2, y=0.1)
        if column.startswith("ppl"):
            values = [p[1] for p in points]
            if max(values) > 10 * min(values):  # pruning without retraining can blow perplexity up by orders
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_ylabel(f"{column} (lower is better)")
        else:
            ax.set_ylabel(column)
        ax.set_xlabel("parameters (M)")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "quality vs parameters")
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def recovery_curve(distill: dict | None) -> list[tuple[int, float]]:
    """(tokens seen, KD loss) at each logged step of a member's distillation (its distill_result.json): how far the
    pruned model came back towards its teacher. The logit part of the loss when logged apart, else the total."""
    if not distill:
        return []
    per_step = distill.get("tokens_per_step") or 0
    return [(int(h["step"]) * per_step, float(h.get("kd_logit", h["loss"])))
            for h in distill.get("log_history", []) if "loss" in h and "step" in h]


def plot_recovery(curves: dict[str, list[tuple[int, float]]], out: str | Path, title: str | None = None) -> Path | None:
    """PNG of each member's KD loss against the tokens it was distilled on (log scale); None when no curve has
    two points."""
    curves = {name: c for name, c in curves.items() if len(c) > 1}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, curve in curves.items():
        ax.plot([t for t, _ in curve], [v for _, v in curve], label=name)
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("KD loss to the teacher (lower is closer)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "recovery by distillation")
    return _save(fig, out)


def render_family_card(results: list[dict], name: str, teacher: str | None = None, members: dict | None = None,
                       plot: str | None = None, license: str | None = None, template_dir: str | Path | None = None,
                       recipe: str | None = None, recovery: str | None = None) -> str:
    """README text for the family (a collection's description page or a family repo): table, plot, member links."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(license=license, tags=list(TAGS), base_model=teacher if is_repo_id(teacher) else None)
    return template_env(template_dir).get_template("family.md.j2").render(
        card_data=data.to_yaml(), name=name, teacher=teacher, table=family_table(results), plot=plot,
        members=members or {}, recipe=recipe, recovery=recovery)


def write_family_report(results: list[dict], out: str | Path, name: str, teacher: str | None = None,
                        members: dict | None = None, license: str | None = None, recipe: str | None = None,
                        curves: dict | None = None) -> dict:
    """The family's comparison in `out`: family_results.json, family.md (table), family.png (plot), README.md (card),
    and recovery.png when `curves` ({member: `recovery_curve`}) has one.

    `results` are the members' records (teacher included, so the plot shows where the family started).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / FAMILY_RESULTS_FILE, "table": out / FAMILY_TABLE_FILE, "plot": out / FAMILY_PLOT,
             "card": out / CARD_FILE}
    paths["results"].write_text(json.dumps(results, indent=1) + "\n")
    paths["table"].write_text(family_table(results))
    plot_family(results, paths["plot"], teacher=teacher, title=name)
    recovery = plot_recovery(curves or {}, out / RECOVERY_PLOT, title=f"{name}: recovery by distillation")
    if recovery:
        paths["recovery"] = recovery
    paths["card"].write_text(render_family_card(results, name, teacher=teacher, members=members, plot=FAMILY_PLOT,
                                                license=license, recipe=recipe,
                                                recovery=RECOVERY_PLOT if recovery else None))
    return paths


# ---- the build's report and publish stages ----


def member_folders(recipe, run) -> list[tuple[str, Path, object]]:
    """(name, folder, recipe member) of every built member and instruct variant, in recipe order."""
    out = []
    for m in recipe.members:
        for name in [m.name] + ([m.name + INSTRUCT_SUFFIX] if m.instruct else []):
            folder = run.member(name)
            if (folder / CONFIG_FILE).is_file():
                out.append((name, folder, m))
    return out


def card_fields(recipe, run, folders) -> dict[str, dict]:
    """{name: what the build knows that a member folder does not}: teacher, data sets, from-scratch tokens, the
    tokens of the member's whole line, the recipe. The cost accounting and the recipe are read once for all."""
    sources = [s for s in (recipe.data.calibration, recipe.data.distillation, recipe.data.sft) if s is not None]
    datasets = sorted({s.path for s in sources if is_repo_id(s.path)})
    recipe_file = run.root / RECIPE_FILE
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
    results = [r for r in [read_json(run.teacher_eval())] + [read_json(f / EVAL_FILE) for _, f, _ in folders] if r]
    if not any(r.get("model") != TEACHER for r in results):
        return None
    fields = card_fields(recipe, run, folders)
    out = run.family()
    curves = {name: recovery_curve(read_json(folder / DISTILL_FILE)) for name, folder, _ in folders}
    paths = write_family_report(results, out, recipe.name, teacher=TEACHER,
                                members={n: f"../{n}" for n, _, _ in folders},
                                recipe=next(iter(fields.values()))["recipe"], curves=curves)
    for name, folder, _ in folders:
        shutil.copy2(paths["plot"], folder / paths["plot"].name)
        plot_recovery({name: curves[name]}, folder / RECOVERY_PLOT, title=f"{name}: recovery by distillation")
        if card_is_generated(folder):
            write_member_card(folder, **fields[name], plot=paths["plot"].name)
    log(f"family report: {paths['table']} , {paths['plot']}; a model card in each member folder")
    return out


def publish_stage(recipe, run, log=print) -> None:
    """Push the members (and the Space, `publish.space`) to `publish.org`, once per change of the members."""
    p = recipe.publish
    folders = member_folders(recipe, run)
    parents = {name: run.output_hash(f"{m.name}/{'distill' if name == m.name else 'sft'}") for name, _, m in folders}

    def fn(action):
        report = publish_run(run.root, p, name=recipe.name, member_card_fields=card_fields(recipe, run, folders))
        log(report.summary())
        pushed = {m.repo_id: m.commit for m in report.members}
        if report.space:
            pushed[report.space.repo_id] = report.space.commit
        return StageOutput(None, hash_json(pushed), record={"repos": pushed})

    run.stage("publish", asdict(p), parents, fn, log=log, main_only=True)
