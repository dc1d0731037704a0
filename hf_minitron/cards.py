"""Model cards for family members and for the family, from the JSON metadata the stages leave in a member folder.

A member folder holds the model (config, weights, tokenizer) plus any of: `pruning.json` (prune), `search.json`
(architecture search), `distill_result.json` (distill), `sft_result.json` (SFT), `eval_results.json` (evaluate).
`collect_member` reads them; explicit arguments fill or override what the folder lacks (the family builder knows the
teacher's Hub id, the data sets, the recipe). Front matter comes from `huggingface_hub.ModelCardData` so the
`model-index` is the Hub's format; the body is a Jinja template in `model_cards/`.

Also here: the family comparison table (markdown) and plot (PNG, quality vs parameters).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .evaluate import RESULTS_FILE, primary_metric
from .resources import shipped

TAGS = ["pruned", "knowledge-distillation", "minitron", "hf-minitron"]
META_FILES = {"pruning": "pruning.json", "search": "search.json", "distill": "distill_result.json",
              "sft": "sft_result.json", "results": RESULTS_FILE}
# lm-eval task -> (Hub dataset id, config, split, display name) for the model-index
TASK_DATASETS = {
    "mmlu": ("cais/mmlu", "all", "test", "MMLU"),
    "hellaswag": ("Rowan/hellaswag", None, "validation", "HellaSwag"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "Winogrande"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "ARC-Challenge"),
    "truthfulqa_mc2": ("truthfulqa/truthful_qa", "multiple_choice", "validation", "TruthfulQA (MC2)"),
    "gsm8k": ("openai/gsm8k", "main", "test", "GSM8K"),
    "humaneval": ("openai/openai_humaneval", None, "test", "HumanEval"),
    "mbpp": ("google-research-datasets/mbpp", "full", "test", "MBPP"),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CardError(ValueError):
    pass


def is_repo_id(spec) -> bool:
    """A Hub repo id ('org/name'), not a local path or a `pkg:` spec: only those may go in `base_model`."""
    return isinstance(spec, str) and bool(_REPO_ID.match(spec)) and not Path(spec).exists()


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _config_dict(config) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


def _load_teacher_config(spec: str | None) -> dict | None:
    """The teacher's config, when it can be had without a download (folder, .gguf, pkg:, or HF cache)."""
    if not spec:
        return None
    try:
        from .models import resolve_source
        from .prune import load_config

        return load_config(resolve_source(spec)).to_dict()
    except Exception:
        return None


def _teacher_license(spec: str | None) -> str | None:
    """License from the teacher's own model card front matter, when its folder is at hand."""
    try:
        from huggingface_hub import metadata_load

        from .models import resolve_source

        readme = Path(resolve_source(spec).folder) / "README.md"
        return (metadata_load(readme) or {}).get("license") if readme.is_file() else None
    except Exception:
        return None


@dataclass
class MemberMeta:
    """Everything a card says about one member; `collect_member` fills it from a folder."""

    name: str
    config: dict
    teacher: str | None = None  # how the teacher was given (repo id, folder, pkg: spec)
    base_model: str | None = None  # Hub id for the front matter: the teacher, or the parent in stepwise pruning
    teacher_config: dict | None = None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    pruning: dict | None = None
    search: dict | None = None
    distill: dict | None = None
    sft: dict | None = None
    results: dict | None = None
    scratch_tokens: int | None = None  # tokens a from-scratch model of this size was trained on, for the ratio
    lineage_tokens: int | None = None  # every token the member's line used (ancestors, calibration, search, KD, SFT)
    parent: str | None = None  # the family member it was pruned from, when not the teacher (member.json)
    distilled_from: str | None = None  # its distillation teacher, when not the teacher (member.json)
    recipe: str | None = None  # text of the recipe (YAML) or commands that reproduce the member
    plot: str | None = None  # file name of the family plot, relative to the card


def collect_member(folder: str | Path, name: str | None = None, **overrides) -> MemberMeta:
    """Read config and metadata files from a member folder; keyword arguments set or replace `MemberMeta` fields."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if config is None:
        raise CardError(f"member folder {str(folder)!r} has no config.json")
    found = {key: read_json(folder / file) for key, file in META_FILES.items()}
    lineage = read_json(folder / "member.json") or {}  # written by the build
    found.update(parent=lineage.get("parent"), distilled_from=lineage.get("distilled_from"))
    meta = MemberMeta(name=name or folder.name, config=config,
                      **{k: v for k, v in found.items() if v is not None})
    unknown = set(overrides) - set(MemberMeta.__dataclass_fields__)
    if unknown:
        raise CardError(f"unknown member field(s) {', '.join(sorted(unknown))}")
    for key, value in overrides.items():
        if value is not None:
            setattr(meta, key, _config_dict(value) if key == "teacher_config" else value)
    if meta.teacher is None:
        meta.teacher = ((meta.pruning or {}).get("teacher") or {}).get("source") or (meta.distill or {}).get("teacher")
    if meta.base_model is None and is_repo_id(meta.teacher):
        meta.base_model = meta.teacher
    if meta.teacher_config is None:
        meta.teacher_config = _load_teacher_config(meta.teacher)
    if meta.license is None:
        meta.license = _teacher_license(meta.teacher)
    if meta.plot is None:
        meta.plot = next((p.name for p in sorted(folder.glob("*.png"))), None)
    return meta


def _shape(config: dict | None) -> dict | None:
    """The architecture-table row of a config (parameters counted exactly from the config)."""
    if not config:
        return None
    from transformers import AutoConfig

    from .archs import count_parameters

    try:
        params = count_parameters(AutoConfig.for_model(**config))
    except Exception:
        params = None
    heads = config.get("num_attention_heads")
    return {"hidden": config.get("hidden_size"), "mlp": config.get("intermediate_size"), "heads": heads,
            "kv_heads": config.get("num_key_value_heads", heads), "layers": config.get("num_hidden_layers"),
            "head_dim": config.get("head_dim") or (config["hidden_size"] // heads if heads else None),
            "params": params}


def human(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def eval_rows(results: dict | None) -> list[dict]:
    """Flat rows (task, shots, metric, value, dataset) of a results record, perplexity first."""
    rows = []
    for ppl in (results or {}).get("perplexity", []):
        rows.append({"task": f"perplexity ({Path(str(ppl['data'])).name}, {ppl['seq_len']} tokens)", "key": "ppl",
                     "shots": None, "metric": "perplexity", "value": ppl["perplexity"], "data": ppl["data"],
                     "stderr": None, "limit": None})
    for task, res in (results or {}).get("tasks", {}).items():
        for metric, value in res.get("metrics", {}).items():
            if "stderr" in metric:
                continue
            rows.append({"task": task, "key": task, "shots": res.get("num_fewshot"), "metric": metric, "value": value,
                         "stderr": res["metrics"].get(f"{metric}_stderr"), "limit": res.get("limit")})
    return rows


def eval_results_for_index(results: dict | None):
    """`huggingface_hub.EvalResult`s for the model-index: known lm-eval tasks name their Hub data set."""
    from huggingface_hub import EvalResult

    out = []
    for row in eval_rows(results):
        if row["key"] == "ppl":
            data = str(row["data"])
            dataset_type = data if is_repo_id(data) else Path(data).stem
            out.append(EvalResult(task_type="text-generation", dataset_type=dataset_type, dataset_name=Path(data).name,
                                  metric_type="perplexity", metric_value=round(row["value"], 4)))
            continue
        dataset_type, config, split, display = TASK_DATASETS.get(row["key"], (row["key"], None, None, row["key"]))
        shots = f" ({row['shots']}-shot)" if row["shots"] is not None else ""
        out.append(EvalResult(task_type="text-generation", dataset_type=dataset_type, dataset_name=display,
                              dataset_config=config, dataset_split=split, metric_type=row["metric"],
                              metric_value=round(row["value"], 4), metric_name=f"{row['metric']}{shots}"))
    return out


def card_data(meta: MemberMeta, model_name: str | None = None):
    """The Hub front matter of a member card."""
    from huggingface_hub import ModelCardData

    evals = eval_results_for_index(meta.results)
    return ModelCardData(model_name=model_name or meta.name, eval_results=evals or None, base_model=meta.base_model,
                         base_model_relation="finetune" if meta.base_model else None, library_name="transformers",
                         pipeline_tag="text-generation", license=meta.license,
                         datasets=[d for d in meta.datasets if is_repo_id(d)] or None, tags=list(TAGS))


def _env(template_dir: str | Path | None):
    import jinja2

    folder = Path(template_dir) if template_dir else shipped("model_cards", "member.md.j2")
    if not folder.is_dir():
        raise CardError(f"model card template folder {str(folder)!r} does not exist")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), undefined=jinja2.ChainableUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["human"] = human
    env.filters["times"] = lambda v: f"{v:,.0f}" if v < 1e5 else human(v)  # 1,000× ; 25.7M×
    env.filters["num"] = lambda v: "?" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}")
    return env


def render_member_card(meta: MemberMeta, repo_id: str | None = None, template_dir: str | Path | None = None) -> str:
    """README.md text for one member: front matter + body from `member.md.j2`."""
    data = card_data(meta, model_name=(repo_id or meta.name).split("/")[-1])
    member, teacher = _shape(meta.config), _shape(meta.teacher_config)
    tokens = meta.lineage_tokens or (meta.distill or {}).get("tokens")
    ratio = meta.scratch_tokens / tokens if tokens and meta.scratch_tokens else None
    return _env(template_dir).get_template("member.md.j2").render(
        card_data=data.to_yaml(), meta=meta, repo_id=repo_id or meta.name, member=member, teacher=teacher,
        tokens=tokens, ratio=ratio, evals=eval_rows(meta.results), teacher_name=meta.base_model or meta.teacher,
        arch=(meta.config.get("architectures") or [meta.config.get("model_type", "?")])[0])


def write_member_card(folder: str | Path, repo_id: str | None = None, template_dir: str | Path | None = None,
                      **overrides) -> Path:
    """Render the card of the member in `folder` into `folder/README.md`."""
    meta = collect_member(folder, **overrides)
    path = Path(folder) / "README.md"
    path.write_text(render_member_card(meta, repo_id, template_dir))
    return path


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
        lines.append(f"| {row['model']} | {human(row['parameters'])} | {share} | " + " | ".join(values) + " |")
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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def render_family_card(results: list[dict], name: str, teacher: str | None = None, members: dict | None = None,
                       plot: str | None = None, license: str | None = None, template_dir: str | Path | None = None,
                       recipe: str | None = None) -> str:
    """README text for the family (a collection's description page or a family repo): table, plot, member links."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(license=license, tags=list(TAGS), base_model=teacher if is_repo_id(teacher) else None)
    return _env(template_dir).get_template("family.md.j2").render(
        card_data=data.to_yaml(), name=name, teacher=teacher, table=family_table(results), plot=plot,
        members=members or {}, recipe=recipe)


def write_family_report(results: list[dict], out: str | Path, name: str, teacher: str | None = None,
                        members: dict | None = None, license: str | None = None, recipe: str | None = None) -> dict:
    """The family's comparison in `out`: family_results.json, family.md (table), family.png (plot), README.md (card).

    `results` are the members' records (teacher included, so the plot shows where the family started).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "family_results.json", "table": out / "family.md", "plot": out / "family.png",
             "card": out / "README.md"}
    paths["results"].write_text(json.dumps(results, indent=1) + "\n")
    paths["table"].write_text(family_table(results))
    plot_family(results, paths["plot"], teacher=teacher, title=name)
    paths["card"].write_text(render_family_card(results, name, teacher=teacher, members=members, plot="family.png",
                                                license=license, recipe=recipe))
    return paths
