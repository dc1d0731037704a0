"""Build recipes: a typed schema (dataclasses), YAML loading and `key.sub=value` overrides.

A recipe is plain YAML with the sections below; every key is checked against the dataclasses, so an unknown or
mistyped key fails at load time with its dotted name (`members.1.params: expected an integer ...`), not an hour
into a build. Token and parameter counts accept suffixes (`100M`, `94B`, `8T`) or scientific notation (`2e12`).

Load: `load_recipe("recipes/quickstart.yaml", ["distill.tokens=1M", "members.small.params=60M"])`.
Members are addressed in overrides by index (`members.0.params`) or by name (`members.small.params`).
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from .data import TextSource
from .prune import PruneTarget


class RecipeError(ValueError):
    pass


# ---- schema -----------------------------------------------------------------------------------------------


@dataclass
class TeacherSection:
    """The model the family is cut from. `config` is optional: a shape block (`model_type` + config fields) so
    parameter counts and search candidates can be computed offline, without downloading the teacher."""

    source: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    trust_remote_code: bool = False
    config: dict | None = None


@dataclass
class DataSection:
    """Sources per stage; `holdout` is the share of documents (from the end) kept out of training whenever the
    evaluation source is the same as the distillation source, so search and evaluation score unseen text
    (calibration reads the whole source: forward passes only, nothing is fitted to it)."""

    calibration: TextSource | None = None  # each a `datasets` source; a plain string is its path
    distillation: TextSource | None = None
    sft: TextSource | None = None
    evaluation: TextSource | None = None
    holdout: float = 0.1


@dataclass
class ImportanceSection:
    samples: int = 1024
    seq_len: int = 4096
    batch_size: int = 1
    batch_agg: str = "l2"
    seq_agg: str = "mean"
    depth_metric: str = "ppl"  # how layers are dropped: ppl | bi | bi-run
    depth_ppl_samples: int = 64  # 0 disables the perplexity-drop metric (then use depth_metric bi or bi-run)
    seed: int = 0


@dataclass
class MemberSection:
    """One family member: an explicit `shape` or a parameter budget `params` (then the search picks the shape)."""

    name: str
    shape: PruneTarget | None = None  # explicit shape; unset axes keep the base model's value
    params: int | None = None
    parent: str | None = None  # prune from this earlier member's distilled weights (the paper's 15B -> 8B -> 4B)
    teacher: str | None = None  # distillation teacher: "teacher", "parent" or a model spec (default: parent, else teacher)
    instruct: bool = False  # also build `<name>-instruct` by SFT on data.sft
    distill_tokens: int | None = None  # overrides distill.tokens for this member
    scratch_tokens: int | None = None  # overrides cost.scratch_tokens for this member
    search: dict | None = None  # overrides of the search section for this member, e.g. {min_width: 0.25}

    def search_settings(self, default: "SearchSection", key: str = "members") -> "SearchSection":
        """The recipe's search section with this member's overrides, type-checked like the rest."""
        return build(SearchSection, {**asdict(default), **(self.search or {})}, f"{key}.search") if self.search \
            else default


@dataclass
class SearchSection:
    """Candidate shapes near a budget, each pruned, briefly LoRA-retrained by distillation and scored."""

    tolerance: float = 0.05  # candidates within +-5% of the budget
    multiple: int = 64  # hidden and MLP sizes are multiples of this
    min_width: float = 0.5  # smallest hidden/MLP/head share of the base model tried
    depth: bool = False  # also vary the layer count (widths only by default)
    min_depth: float = 0.5
    max_candidates: int = 8  # keep the ones nearest to the budget
    tokens: int = 1_000_000  # LoRA retraining tokens per candidate (paper: rankings settle after ~300 steps)
    seq_len: int = 512
    batch_size: int = 4
    lr: float = 1e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target: str = "all-linear"
    eval_windows: int = 8
    eval_seq_len: int = 512
    adapter: str = "discard"  # the winner's adapter: merge into the pruned weights, or discard before distillation


@dataclass
class DistillSection:
    tokens: int = 1_000_000_000
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.0
    logit_loss: str = "forward_kl"
    temperature: float = 1.0
    top_k: int | None = None
    w_clm: float = 0.0
    is_layers: str | None = None
    save_steps: int = 500
    logging_steps: int = 10
    seed: int = 42
    keep_checkpoints: bool = False  # delete checkpoints once a member is finished
    options: dict = field(default_factory=dict)  # any other DistillConfig field, passed as it is


@dataclass
class SFTSection:
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 1e-4
    lora: bool = True
    lora_r: int = 16
    batch_size: int = 8
    max_length: int = 1024
    chat_template: str | None = None
    save_steps: int = 500


@dataclass
class EvaluateSection:
    seq_len: int = 512
    windows: int = 16
    teacher: bool = True  # also score the teacher, for the summary
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks (need their data sets)
    limit: int | None = None


@dataclass
class PublishSection:
    """Where the build pushes the family (nothing is pushed unless `org` is set)."""

    org: str | None = None  # Hub user or organization: one model repo per member, ORG/<member name>
    private: bool = False
    collection: str | None = None  # also gather the members in a collection with this title
    space: str | None = None  # also push the comparison Space as ORG/<space>


@dataclass
class CostSection:
    """Tokens a model of each member's size would be trained on from scratch (e.g. the teacher's pretraining)."""

    scratch_tokens: int | None = None


@dataclass
class Recipe:
    name: str
    teacher: TeacherSection
    members: list[MemberSection]
    data: DataSection = field(default_factory=DataSection)
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    search: SearchSection = field(default_factory=SearchSection)
    distill: DistillSection = field(default_factory=DistillSection)
    sft: SFTSection = field(default_factory=SFTSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    publish: PublishSection = field(default_factory=PublishSection)
    cost: CostSection = field(default_factory=CostSection)

    def member(self, name: str) -> MemberSection:
        for m in self.members:
            if m.name == name:
                return m
        raise RecipeError(f"no member {name!r}; members: {', '.join(m.name for m in self.members)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ---- typed construction -------------------------------------------------------------------------------------

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(value, key: str = "value") -> int:
    """100M, 1.5B, 8T, 2e12, 1_000 -> int; a one-line error naming `key` otherwise."""
    if isinstance(value, bool):
        raise RecipeError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", value)
        if m:
            number = float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1)
            if number.is_integer():
                return int(number)
    raise RecipeError(f"{key}: expected an integer (e.g. 512, 100M, 94B, 2e12), got {value!r}")


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if value is None:
        raise RecipeError(f"{key}: a value is required")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if is_dataclass(tp):
        if tp is TextSource and isinstance(value, str):
            value = {"path": value}
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        return parse_count(value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise RecipeError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - schema bug


def build(cls, data, key: str = ""):
    """A dataclass instance from a mapping, checking every key and value type; errors name the dotted key."""
    where = key or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise RecipeError(f"unknown key {(key + '.' if key else '') + str(unknown[0])!r}; "
                          f"{where} accepts: {', '.join(known)}")
    values = {}
    for name, f in known.items():
        dotted = f"{key}.{name}" if key else name
        if name in data:
            values[name] = _coerce(hints[name], data[name], dotted)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise RecipeError(f"{dotted}: missing (required)")
    return cls(**values)


# ---- overrides ------------------------------------------------------------------------------------------------


def apply_override(raw: dict, assignment: str) -> None:
    """Set `a.b.c=value` in the raw recipe mapping; the value is read as YAML (`true`, `3`, `[1, 2]`, `100M`)."""
    import yaml

    dotted, sep, text = assignment.partition("=")
    if not sep or not dotted.strip():
        raise RecipeError(f"override {assignment!r} is not key.sub=value")
    parts = dotted.strip().split(".")
    value = yaml.safe_load(text) if text.strip() else None
    node = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"override {dotted}: {here} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, key: str) -> int:
    if part.lstrip("-").isdigit():
        i = int(part)
        if not -len(items) <= i < len(items):
            raise RecipeError(f"override {key}: index {i} out of range (0..{len(items) - 1})")
        return i
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [str(item.get("name")) for item in items if isinstance(item, dict)]
    raise RecipeError(f"override {key}: no entry named {part!r}; names: {', '.join(names)}")


# ---- loading and semantic checks ---------------------------------------------------------------------------------

AGGREGATIONS = ("mean", "l2", "var")
DEPTH_METRICS = ("ppl", "bi", "bi-run")
DTYPES = ("float32", "bfloat16", "float16")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


def validate(recipe: Recipe) -> Recipe:
    """Checks across keys: member names, parents, budgets, choices, the data each stage needs."""
    from .losses import LOGIT_LOSSES

    _check(bool(recipe.teacher.source), "teacher.source: missing; give it in the recipe or with --teacher")
    _check(recipe.teacher.dtype in (None, *DTYPES), f"teacher.dtype: {recipe.teacher.dtype!r} is not one of "
           f"{', '.join(DTYPES)}")
    _check(bool(recipe.members), "members: the recipe builds no member")
    seen: list[str] = []
    for i, m in enumerate(recipe.members):
        key = f"members.{i}"
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", m.name)),
               f"{key}.name: {m.name!r} must be a folder name (letters, digits, . _ -)")
        _check(m.name not in seen, f"{key}.name: {m.name!r} appears twice")
        _check((m.shape is None) != (m.params is None), f"{key}: give either shape or params (a parameter budget)"
               f", not {'both' if m.shape else 'neither'}")
        _check(m.params is None or m.params > 0, f"{key}.params: must be positive, got {m.params}")
        _check(m.parent is None or m.parent in seen, f"{key}.parent: {m.parent!r} is not an earlier member; "
               f"earlier: {', '.join(seen) or 'none'}")
        _check(not (m.teacher == "parent" and m.parent is None), f"{key}.teacher: 'parent' needs a parent")
        if m.shape and m.shape.drop_layers is not None:
            _check(m.shape.num_layers is None, f"{key}.shape: give num_layers or drop_layers, not both")
        seen.append(m.name)
    imp = recipe.importance
    for k in ("batch_agg", "seq_agg"):
        _check(getattr(imp, k) in AGGREGATIONS, f"importance.{k}: {getattr(imp, k)!r} is not one of "
               f"{', '.join(AGGREGATIONS)}")
    _check(imp.depth_metric in DEPTH_METRICS, f"importance.depth_metric: {imp.depth_metric!r} is not one of "
           f"{', '.join(DEPTH_METRICS)}")
    uses_depth = recipe.search.depth or any(m.shape and m.shape.num_layers for m in recipe.members)
    _check(not (uses_depth and imp.depth_metric == "ppl" and imp.depth_ppl_samples == 0),
           "importance.depth_ppl_samples: 0 disables the 'ppl' depth metric that layer pruning uses; set it > 0 "
           "or importance.depth_metric: bi")
    for i, m in enumerate(recipe.members):
        _check_search(m.search_settings(recipe.search, f"members.{i}"), f"members.{i}.search" if m.search else "search")
    _check(recipe.distill.logit_loss in LOGIT_LOSSES, f"distill.logit_loss: {recipe.distill.logit_loss!r} is not "
           f"one of {', '.join(LOGIT_LOSSES)}")
    _check(recipe.distill.tokens > 0, f"distill.tokens: must be positive, got {recipe.distill.tokens}")
    _check(0 <= recipe.data.holdout < 1, f"data.holdout: must be in [0, 1), got {recipe.data.holdout}")
    _check(recipe.data.calibration is not None, "data.calibration: missing (text for importance scoring)")
    _check(recipe.data.distillation is not None, "data.distillation: missing (text for distillation)")
    _check(recipe.data.sft is not None or not any(m.instruct for m in recipe.members),
           "data.sft: missing, but a member has instruct: true")
    _check(recipe.publish.org is not None or not (recipe.publish.space or recipe.publish.collection),
           "publish.org: missing, but publish.space or publish.collection is set")
    return recipe


def _check_search(s: SearchSection, key: str) -> None:
    _check(0 < s.tolerance < 1, f"{key}.tolerance: must be in (0, 1), got {s.tolerance}")
    _check(s.multiple >= 1, f"{key}.multiple: must be >= 1, got {s.multiple}")
    _check(0 < s.min_width <= 1 and 0 < s.min_depth <= 1, f"{key}.min_width and min_depth must be in (0, 1]")
    _check(s.max_candidates >= 1, f"{key}.max_candidates: must be >= 1, got {s.max_candidates}")
    _check(s.adapter in ("merge", "discard"), f"{key}.adapter: {s.adapter!r} is not one of merge, discard")


def from_dict(raw: dict, overrides: list[str] = ()) -> Recipe:
    import copy

    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(build(Recipe, raw))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, check types and cross-key rules."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections")
    raw.setdefault("name", path.stem)
    return from_dict(raw, overrides)


def teacher_config(recipe: Recipe):
    """The teacher's config: from the recipe's `teacher.config` shape block when given (offline), else its files."""
    if recipe.teacher.config:
        from transformers import AutoConfig

        block = dict(recipe.teacher.config)
        model_type = block.pop("model_type", None)
        _check(bool(model_type), "teacher.config: needs model_type (e.g. llama, nemotron, qwen2, mistral)")
        try:
            return AutoConfig.for_model(model_type, **block)
        except ValueError as e:
            raise RecipeError(f"teacher.config: {str(e).splitlines()[0]}") from None
    from .models import resolve_source
    from .prune import load_config

    t = recipe.teacher
    return load_config(resolve_source(t.source, revision=t.revision, gguf_file=t.gguf_file), t.trust_remote_code)
