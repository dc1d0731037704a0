"""Build recipes: YAML whose sections are the stages' own configs, plus `key.sub=value` overrides.

Each section *is* its stage's config, with the same keys as the stage's CLI flags: `importance:` is
`ImportanceConfig`, `prune:` `PruneConfig`, `search:` `SearchConfig`, `distill:` `DistillConfig` (TRL's
`SFTConfig` fields plus the Minitron loss and `tokens`), `sft:` `InstructConfig`, `evaluate:` `EvaluateConfig`,
`publish:` `PublishConfig`, `teacher:` `ModelArgs`. Every key is checked when the recipe loads, so a mistyped key
fails with its dotted name (`members.1.params: expected an integer ...`), not an hour into a build.

Load: `load_recipe("recipes/quickstart.yaml", ["distill.tokens=1M", "members.small.params=60M"])`.
Members are addressed in overrides by index (`members.0.params`) or by name (`members.small.params`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import DataSources
from .evaluate import EvaluateConfig
from .importance import ImportanceConfig
from .models import TeacherArgs
from .prune import PruneConfig, PruneTarget
from .publish import PublishConfig
from .rundir import PARENT, RESERVED_NAMES, TEACHER
from .schema import (SettingError, apply_override, check_mapping, folder_name, from_mapping, load_yaml,  # noqa: F401
                     parse_count)
from .search import SearchConfig

RecipeError = SettingError
# keys of earlier recipe versions, pointed at their new names
RENAMED = {"distill.lr": "distill.learning_rate", "distill.seq_len": "distill.max_length", "distill.batch_size":
           "distill.per_device_train_batch_size", "distill.grad_accum": "distill.gradient_accumulation_steps",
           "distill.warmup": "distill.warmup_steps", "distill.options": "its keys, directly in distill", "sft.lr":
           "sft.learning_rate", "sft.epochs": "sft.num_train_epochs", "sft.batch_size":
           "sft.per_device_train_batch_size", "importance.depth_metric": "prune.depth_metric"}


@dataclass
class MemberSection:
    """One family member: an explicit `shape` or a parameter budget `params` (then the search picks the shape)."""

    name: str
    shape: PruneTarget | None = None  # explicit shape; unset axes keep the base model's value
    params: int | None = None
    parent: str | None = None  # prune from this earlier member's distilled weights (the paper's 15B -> 8B -> 4B)
    teacher: str | None = None  # distillation teacher: "teacher", "parent" or a model spec (default: parent/teacher)
    instruct: bool = False  # also build `<name>-instruct` by SFT on data.sft
    distill_tokens: int | None = None  # overrides distill.tokens for this member
    scratch_tokens: int | None = None  # overrides cost.scratch_tokens for this member
    search: dict | None = None  # overrides of the search section for this member, e.g. {min_width: 0.25}
    distill: dict | None = None  # overrides of the distill section for this member, e.g. {unlikelihood: 0.5}

    @property
    def base(self) -> str:
        """The model this member is pruned from: its parent member, or the teacher."""
        return self.parent or TEACHER

    @property
    def kd_teacher(self) -> str:
        """The model it is distilled from: `teacher`, a member name, or a model spec."""
        ref = self.teacher or (PARENT if self.parent else TEACHER)
        return self.parent if ref == PARENT else ref

    def search_settings(self, default: SearchConfig, key: str = "members") -> SearchConfig:
        """The recipe's search section with this member's overrides, type-checked like the rest."""
        if not self.search:
            return default
        return from_mapping(SearchConfig, {**asdict(default), **self.search}, f"{key}.search")


@dataclass
class CostSection:
    """Tokens a model of each member's size would be trained on from scratch (e.g. the teacher's pretraining)."""

    scratch_tokens: int | None = None


@dataclass
class Recipe:
    name: str
    teacher: TeacherArgs
    members: list[MemberSection]
    data: DataSources = field(default_factory=DataSources)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: dict = field(default_factory=dict)  # DistillConfig fields (checked by `validate`)
    sft: dict = field(default_factory=dict)  # InstructConfig fields (checked by `validate`)
    teacher_correction: dict = field(default_factory=dict)  # CorrectionConfig fields; on when it sets tokens
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    cost: CostSection = field(default_factory=CostSection)

    def member(self, name: str) -> MemberSection:
        for m in self.members:
            if m.name == name:
                return m
        raise RecipeError(f"no member {name!r}; members: {', '.join(m.name for m in self.members)}")

    def distill_tokens(self, m: MemberSection) -> int:
        return m.distill_tokens or self.distill["tokens"]

    def distill_settings(self, m: MemberSection) -> dict:
        """The distill section as member `m` trains with it: the recipe's, its own overrides, its token budget."""
        return {**self.distill, **(m.distill or {}), "tokens": self.distill_tokens(m)}

    def distill_setting(self, key: str, m: MemberSection | None = None):
        """A distillation setting as a build runs it (for member `m`, with its overrides): the recipe's, else
        `DistillConfig`'s default (read without building trainer arguments, which check the hardware)."""
        from .distill import DistillConfig

        values = self.distill_settings(m) if m is not None else self.distill
        return values.get(key, DistillConfig.__dataclass_fields__[key].default)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ---- loading and semantic checks ---------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


HARDWARE_KEYS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval", "use_cpu", "torch_compile")
# distill settings a member cannot override: the windows, batch and teacher cache every member of a build shares
# (one cache per teacher, data and window), the hardware, and the budget (members.N.distill_tokens sets that)
FAMILY_DISTILL_KEYS = ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "teacher_cache",
                       "teacher_cache_top_k", "teacher_cache_top_p", "tokens", *HARDWARE_KEYS)


def _trainer_section(cls, values: dict, key: str, exclude) -> dict:
    """A trainer section: its keys checked against `cls`, then the whole config built once (with a throwaway
    output folder) so cross-field errors (a bad `is_layers`, a loss name) surface at load time."""
    values = check_mapping(cls, values, key, exclude)
    here = {k: v for k, v in values.items() if k not in HARDWARE_KEYS}  # checked where the build runs
    try:
        cls(output_dir="recipe-check", **here)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{key}: {str(e).splitlines()[0]}") from None
    return values


def _check_member(recipe: Recipe, i: int, m: MemberSection, seen: list[str]) -> None:
    key = f"members.{i}"
    folder_name(m.name, f"{key}.name")
    _check(m.name not in RESERVED_NAMES, f"{key}.name: {m.name!r} is reserved (run-folder entries and model "
           f"references: {', '.join(sorted(RESERVED_NAMES))})")
    _check(not m.name.endswith("-instruct"), f"{key}.name: {m.name!r} ends in -instruct, the name of SFT variants")
    _check(m.name not in seen, f"{key}.name: {m.name!r} appears twice")
    _check((m.shape is None) != (m.params is None), f"{key}: give either shape or params (a parameter budget)"
           f", not {'both' if m.shape else 'neither'}")
    _check(m.params is None or m.params > 0, f"{key}.params: must be positive, got {m.params}")
    _check(m.parent is None or m.parent in seen, f"{key}.parent: {m.parent!r} is not an earlier member; "
           f"earlier: {', '.join(seen) or 'none'}")
    _check(not (m.teacher == PARENT and m.parent is None), f"{key}.teacher: 'parent' needs a parent")
    _check(m.kd_teacher in seen or m.kd_teacher not in [x.name for x in recipe.members], f"{key}.teacher: "
           f"{m.kd_teacher!r} is not an earlier member (a member is not distilled from itself or a later one)")
    if m.shape and m.shape.drop_layers is not None:
        _check(m.shape.num_layers is None, f"{key}.shape: give num_layers or drop_layers, not both")
    _check(bool(recipe.distill.get("tokens") or m.distill_tokens),
           f"{key}: no distillation budget; set distill.tokens (or {key}.distill_tokens)")
    try:
        m.search_settings(recipe.search, key).check(f"{key}.search" if m.search else "search")
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if m.distill:
        from .distill import EXCLUDED, DistillConfig

        fixed = sorted(set(m.distill) & set(FAMILY_DISTILL_KEYS))
        _check(not fixed, f"{key}.distill.{fixed[0] if fixed else ''}: shared by the whole family; set it in the "
               f"distill section" + (f" ({key}.distill_tokens for the budget)" if fixed == ["tokens"] else ""))
        m.distill = check_mapping(DistillConfig, m.distill, f"{key}.distill", EXCLUDED)
        _trainer_section(DistillConfig, {**recipe.distill, **m.distill}, f"{key}.distill", EXCLUDED)


def validate(recipe: Recipe) -> Recipe:
    """Checks across keys: member names, parents, budgets, the trainer sections, the data each stage needs."""
    from .correction import EXCLUDED as CORRECTION_EXCLUDED
    from .correction import CorrectionConfig
    from .distill import EXCLUDED as DISTILL_EXCLUDED
    from .distill import DistillConfig
    from .sft import EXCLUDED as SFT_EXCLUDED
    from .sft import InstructConfig

    folder_name(recipe.name, "name")  # the default run folder is runs/<name>
    _check(bool(recipe.teacher.source), "teacher.source: missing; give it in the recipe or with --teacher")
    _check(bool(recipe.members), "members: the recipe builds no member")
    recipe.distill = _trainer_section(DistillConfig, recipe.distill, "distill", DISTILL_EXCLUDED)
    recipe.sft = _trainer_section(InstructConfig, recipe.sft, "sft", SFT_EXCLUDED)
    recipe.teacher_correction = _trainer_section(CorrectionConfig, recipe.teacher_correction, "teacher_correction",
                                                 CORRECTION_EXCLUDED)
    seen: list[str] = []
    for i, m in enumerate(recipe.members):
        _check_member(recipe, i, m, seen)
        seen.append(m.name)
    uses_depth = recipe.search.depth or any(m.shape and m.shape.num_layers for m in recipe.members)
    metric = recipe.prune.depth_metric
    _check(not (uses_depth and metric.startswith("ppl") and recipe.importance.depth_ppl_samples == 0),
           f"importance.depth_ppl_samples: 0 disables the {metric!r} depth metric that layer pruning uses; set it > 0 "
           "or prune.depth_metric: bi")
    _check(recipe.prune.head_score != "ablation" or recipe.importance.head_ablation_samples > 0,
           "importance.head_ablation_samples: 0 disables the 'ablation' head score; set it > 0 or another "
           "prune.head_score")
    try:
        recipe.evaluate.check()
    except ValueError as e:
        raise RecipeError(f"evaluate.tasks: {e}") from None
    recipe.data.check(needs_sft=any(m.instruct for m in recipe.members))
    _check(recipe.publish.org is not None or not (recipe.publish.space or recipe.publish.collection),
           "publish.org: missing, but publish.space or publish.collection is set")
    return recipe


def _renamed(raw: dict) -> None:
    for dotted, new in RENAMED.items():
        section, _, key = dotted.partition(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise RecipeError(f"{dotted} is now {new} (recipe keys are the stage config's fields, as its flags)")


def from_dict(raw: dict, overrides: list[str] = ()) -> Recipe:
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    _renamed(raw)
    return validate(from_mapping(Recipe, raw))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, check types and cross-key rules."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    raw = load_yaml(path.read_text(), f"recipe {str(path)!r}")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections")
    raw.setdefault("name", path.stem)
    return from_dict(raw, overrides)
