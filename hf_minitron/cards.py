"""Model cards for family members, from the JSON metadata the stages leave in a member folder.

A member folder holds the model (config, weights, tokenizer), `member.json` (`rundir.MemberRecord`: base or instruct,
and what it was pruned, distilled or fine-tuned from) and any of: `pruning.json` (prune), `search.json` (architecture
search), `distill_result.json` (distill), `sft_result.json` (SFT), `eval_results.json` (evaluate). An instruct
variant's card also shows how its base member was made, from the base's files when the variant lacks them.
`collect_member` reads them; explicit arguments fill or override what the folder lacks (the family builder knows the
teacher's Hub id, the data sets, the recipe). Front matter comes from `huggingface_hub.ModelCardData` so the
`model-index` is the Hub's format; the body is a Jinja template in `model_cards/`. The family card is `report.py`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .resources import shipped
from .rundir import (CARD_FILE, CONFIG_FILE, DISTILL_FILE, EVAL_FILE, PRUNING_FILE, RECOVERY_PLOT, SEARCH_FILE,
                     SFT_FILE, TEACHER, MemberRecord)
from .utils import first_line, read_json, si

TAGS = ["pruned", "knowledge-distillation", "minitron", "hf-minitron"]
META_FILES = {"pruning": PRUNING_FILE, "search": SEARCH_FILE, "distill": DISTILL_FILE, "sft": SFT_FILE,
              "results": EVAL_FILE}
BASE_META = ("pruning", "search", "distill")  # what an instruct variant shows of its base member
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


def _config_dict(config) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


def _load_teacher_config(spec: str | None) -> dict | None:
    """The teacher's config, when it can be had (folder, .gguf, pkg:, HF cache or Hub); None when it cannot be
    reached (offline and not cached, a folder since removed): the card then shows the member's column only."""
    if not spec:
        return None
    from .models import load_config, resolve_source

    try:
        return load_config(resolve_source(spec)).to_dict()
    except (OSError, ValueError):  # ModelLoadError is a ValueError; a missing config.json an OSError
        return None


def _teacher_license(spec: str | None) -> str | None:
    """License from the teacher's own model card front matter, when its folder can be reached."""
    if not spec:
        return None
    from huggingface_hub import metadata_load

    from .models import resolve_source

    try:
        readme = Path(resolve_source(spec).folder) / CARD_FILE
    except (OSError, ValueError):  # not reachable: as in _load_teacher_config
        return None
    return (metadata_load(readme) or {}).get("license") if readme.is_file() else None


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
    kind: str = "base"  # "instruct": the SFT variant of a base member (member.json)
    # lineage from member.json; an instruct variant shows its base member's pruned_from and distilled_from
    pruned_from: str | None = None  # TEACHER, or the earlier member it was pruned from
    distilled_from: str | None = None  # its distillation teacher: TEACHER, a member, or a model spec
    sft_from: str | None = None  # the base member an instruct variant was fine-tuned from
    recipe: str | None = None  # text of the recipe (YAML) or commands that reproduce the member
    plot: str | None = None  # file name of the family plot, relative to the card
    recovery_plot: str | None = None  # file name of the member's recovery curve (KD loss against tokens)


def collect_member(folder: str | Path, name: str | None = None, **overrides) -> MemberMeta:
    """Read config and metadata files from a member folder; keyword arguments set or replace `MemberMeta` fields."""
    folder = Path(folder)
    config = read_json(folder / CONFIG_FILE)
    if config is None:
        raise CardError(f"member folder {str(folder)!r} has no {CONFIG_FILE}")
    found = {key: read_json(folder / file) for key, file in META_FILES.items()}
    found.update(_lineage(folder, found))
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
        meta.plot = next((p.name for p in sorted(folder.glob("*.png")) if p.name != RECOVERY_PLOT), None)
    if meta.recovery_plot is None and (folder / RECOVERY_PLOT).is_file():
        meta.recovery_plot = RECOVERY_PLOT
    return meta


def _lineage(folder: Path, found: dict) -> dict:
    """MemberMeta fields from member.json; an instruct variant also takes its base member's pruning, search and
    distillation metadata (from the base folder next to it, when its own folder lacks them) and lineage."""
    record = MemberRecord.read(folder)
    if record is None:
        return {}
    out = {"kind": record.kind, "teacher": record.teacher, "pruned_from": record.pruned_from,
           "distilled_from": record.distilled_from, "sft_from": record.sft_from}
    if record.kind == "instruct" and record.sft_from:
        base = folder.parent / record.sft_from
        for key in BASE_META:
            if found[key] is None:
                out[key] = read_json(base / META_FILES[key])
        base_record = MemberRecord.read(base) if base.is_dir() else None
        if base_record is not None:
            out.update(pruned_from=base_record.pruned_from, distilled_from=base_record.distilled_from)
    return out


def _shape(config: dict | None, what: str) -> dict | None:
    """The architecture-table row of a config, through the `archs` helpers (parameters counted exactly)."""
    if not config:
        return None
    from transformers import AutoConfig

    from .archs import count_parameters, head_dim, intermediate_size, num_kv_heads

    try:
        c = AutoConfig.for_model(**config)
        return {"hidden": c.hidden_size, "mlp": intermediate_size(c), "heads": c.num_attention_heads,
                "kv_heads": num_kv_heads(c), "head_dim": head_dim(c), "layers": c.num_hidden_layers,
                "params": count_parameters(c)}
    except (ValueError, KeyError, AttributeError) as e:  # unknown model_type, unsupported family, missing key
        raise CardError(f"cannot read the {what}'s architecture from its config: {first_line(e)}") from e


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


def template_env(template_dir: str | Path | None):
    """The Jinja environment of the card templates (`model_cards/`, or `template_dir`), with the cards' filters."""
    import jinja2

    folder = Path(template_dir) if template_dir else shipped("model_cards", "member.md.j2")
    if not folder.is_dir():
        raise CardError(f"model card template folder {str(folder)!r} does not exist")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), undefined=jinja2.ChainableUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["si"] = lambda v: si(v, "?")
    env.filters["times"] = lambda v: f"{v:,.0f}" if v < 1e5 else si(v)  # 1,000× ; 25.7M×
    env.filters["num"] = lambda v: "?" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}")
    return env


def render_member_card(meta: MemberMeta, repo_id: str | None = None, template_dir: str | Path | None = None) -> str:
    """README.md text for one member: front matter + body from `member.md.j2`."""
    data = card_data(meta, model_name=(repo_id or meta.name).split("/")[-1])
    member, teacher = _shape(meta.config, "member"), _shape(meta.teacher_config, "teacher")
    tokens = meta.lineage_tokens or (meta.distill or {}).get("tokens")
    ratio = meta.scratch_tokens / tokens if tokens and meta.scratch_tokens else None
    return template_env(template_dir).get_template("member.md.j2").render(
        card_data=data.to_yaml(), meta=meta, repo_id=repo_id or meta.name, member=member, teacher=teacher,
        tokens=tokens, ratio=ratio, evals=eval_rows(meta.results), teacher_name=meta.base_model or meta.teacher,
        chained=meta.pruned_from not in (None, TEACHER),
        arch=(meta.config.get("architectures") or [meta.config.get("model_type", "?")])[0])


def write_member_card(folder: str | Path, repo_id: str | None = None, template_dir: str | Path | None = None,
                      **overrides) -> Path:
    """Render the card of the member in `folder` into `folder/README.md`."""
    meta = collect_member(folder, **overrides)
    path = Path(folder) / CARD_FILE
    path.write_text(render_member_card(meta, repo_id, template_dir))
    return path
