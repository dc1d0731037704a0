"""Prune a teacher into a standard `PreTrainedModel` from cached importance scores.

Width (hidden channels, MLP neurons, query heads, optionally whole KV groups) and depth (layers) in one pass.
The student is built from a resized config (explicit `head_dim`, sliced `layer_types`) and filled by slicing
the teacher's tensors one at a time, so peak memory stays near teacher + student (`mode: stream`,
`prune_stream.py`, writes the same tensors from a safetensors folder one layer at a time). Pruned query heads can
be merged into kept ones (Minitron section 2.3, `merge_heads`). The output folder loads with
`AutoModelForCausalLM.from_pretrained`.

Run alone: `hf-minitron prune --teacher T --importance SCORES --ffn-size F ... --out DIR`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .archs import count_parameters, get_arch, head_dim, intermediate_size, num_kv_heads
from .heads import HeadScore
from .importance import DEPTH_METRICS, ImportanceScores
from .rundir import PRUNING_FILE, StageOutput, hash_folder


_KEEP = {"default_text": "keep"}  # an unset axis keeps the base model's size


@dataclass
class PruneTarget:
    """The student's shape; an unset axis keeps the base model's value."""

    hidden_size: int | None = field(default=None, metadata={**_KEEP, "help": "embedding channels to keep"})
    ffn_size: int | None = field(default=None, metadata={**_KEEP, "help": "MLP neurons to keep per layer"})
    num_heads: int | None = field(default=None, metadata={
        **_KEEP, "help": "query heads to keep per layer, the same count in every KV group"})
    num_kv_heads: int | None = field(default=None, metadata={
        **_KEEP, "help": "KV heads to keep: prunes whole GQA groups (unset: all, except MHA where it follows heads)"})
    num_layers: int | None = field(default=None, metadata={
        **_KEEP, "help": "layers to keep: drops the least important ones by the depth metric"})
    drop_layers: list[int] | None = field(default=None, metadata={
        **_KEEP, "help": "layers to drop by index, e.g. 16,17,18 (instead of num_layers)"})


AggregationName = Literal["mean", "l2", "var"]


@dataclass
class PruneConfig:
    """How scores turn into a plan: which aggregation, which depth metric, whether pruned heads are merged."""

    batch_agg: AggregationName | None = field(default=None, metadata={
        "help": "aggregation over the batch (none: the one recorded with the scores, batch=l2 by default)"})
    seq_agg: AggregationName | None = field(default=None, metadata={
        "help": "aggregation over the sequence (none: the one recorded with the scores, seq=mean by default)"})
    depth_metric: Literal["ppl", "ppl-run", "bi", "bi-run"] = field(default="ppl", metadata={
        "help": "how num_layers picks layers: ppl = smallest perplexity increase one layer at a time, ppl-run = "
                "the contiguous run with the smallest increase (needs importance --depth-ppl-runs with the number "
                "of layers dropped), bi = lowest Block Importance, bi-run = the contiguous run with the lowest BI"})
    head_score: HeadScore = field(default="output", metadata={
        "help": "which head score ranks the heads: output = norm of the head's contribution after o_proj (best "
                "measured, docs/fidelity.md), input = norm of its output before o_proj (the paper's), ablation = "
                "perplexity increase when the head is zeroed (needs importance --head-ablation-samples)"})
    merge_heads: bool = field(default=False, metadata={
        "help": "merge pruned query heads into kept ones, head_k <- 2 head_k - head_p on the query rows (paper "
                "section 2.3); off by default: on SmolLM2 it makes a head prune up to ~12x worse before retraining "
                "and still ~1.5-2x worse after equal KD (docs/fidelity.md)"})
    mode: Literal["auto", "memory", "stream"] = field(default="auto", metadata={
        "help": "memory = load the whole teacher and build the student in memory; stream = write the student's "
                "safetensors straight from a safetensors teacher folder one tensor group (the embeddings, a layer, "
                "the final norm and LM head) at a time, never holding either model whole (the same tensors); auto "
                "= stream when the teacher is given as a safetensors folder and no search adapter is merged, else "
                "memory. A GGUF teacher (or a model a caller already loaded) is pruned in memory, with a note"})


@dataclass
class PrunePlan:
    """What survives: teacher indices per axis, per kept layer."""

    config: object
    layers: list[int]
    hidden: torch.Tensor
    heads: list[torch.Tensor] = field(default_factory=list)  # kept query heads per kept layer (teacher numbering)
    groups: list[torch.Tensor] = field(default_factory=list)  # kept KV groups per kept layer
    ffn: list[torch.Tensor] = field(default_factory=list)
    head_merges: list[list[tuple[int, int]]] = field(default_factory=list)  # (kept, pruned) query heads
    group_merges: list[list[tuple[int, int]]] = field(default_factory=list)  # (kept, pruned) KV groups (MHA only)


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def resolve_target(config, target: PruneTarget) -> dict:
    """Validate a target against the teacher's config; the full student shape, or a one-line error."""
    spec = get_arch(config)
    heads, kv, layers = config.num_attention_heads, num_kv_heads(config), config.num_hidden_layers
    hidden, ffn = config.hidden_size, intermediate_size(config, spec)
    def pick(value, default):
        return default if value is None else value

    new_hidden = pick(target.hidden_size, hidden)
    new_ffn = pick(target.ffn_size, ffn)
    new_heads = pick(target.num_heads, heads)
    _check(0 < new_hidden <= hidden, f"hidden size {new_hidden} must be in 1..{hidden} (the teacher's)")
    _check(0 < new_ffn <= ffn, f"ffn size {new_ffn} must be in 1..{ffn} (the teacher's)")
    _check(0 < new_heads <= heads, f"number of heads {new_heads} must be in 1..{heads} (the teacher's)")
    group = heads // kv
    if target.num_kv_heads is not None:
        new_kv = target.num_kv_heads
    elif group == 1:
        new_kv = new_heads  # MHA: every head is its own KV group
    else:
        new_kv = kv
    _check(0 < new_kv <= kv, f"number of KV heads {new_kv} must be in 1..{kv} (the teacher's)")
    _check(new_heads % new_kv == 0, f"number of heads {new_heads} is not divisible by the {new_kv} KV heads"
           + ("" if target.num_kv_heads else "; set num_kv_heads to prune whole KV groups"))
    _check(new_heads // new_kv <= group, f"{new_heads} heads over {new_kv} KV groups is {new_heads // new_kv} "
           f"query heads per group, more than the teacher's {group}")
    _check(not spec.hidden_divisible_by_heads or new_hidden % new_heads == 0,
           f"hidden size {new_hidden} is not a multiple of the {new_heads} attention heads, which "
           f"{type(config).__name__} requires")
    if target.drop_layers is not None:
        _check(target.num_layers is None, "give either num_layers or drop_layers, not both")
        bad = [i for i in target.drop_layers if not 0 <= i < layers]
        _check(not bad, f"layers to drop {bad} out of range 0..{layers - 1}")
        _check(len(set(target.drop_layers)) == len(target.drop_layers), f"duplicate layers in {target.drop_layers}")
        new_layers = layers - len(target.drop_layers)
    else:
        new_layers = pick(target.num_layers, layers)
    _check(0 < new_layers <= layers, f"number of layers {new_layers} must be in 1..{layers} (the teacher's)")
    return {"hidden_size": new_hidden, "ffn_size": new_ffn, "num_heads": new_heads, "num_kv_heads": new_kv,
            "num_layers": new_layers}


def student_config(config, target: PruneTarget, kept_layers: list[int] | None = None):
    """The resized config: explicit head_dim, per-layer lists sliced to the kept layers, no quantization state."""
    spec = get_arch(config)
    shape = resolve_target(config, target)
    kept_layers = kept_layers if kept_layers is not None else list(range(shape["num_layers"]))
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.update(hidden_size=shape["hidden_size"], num_attention_heads=shape["num_heads"],
             num_key_value_heads=shape["num_kv_heads"], num_hidden_layers=len(kept_layers), head_dim=head_dim(config))
    d[spec.intermediate_key] = shape["ffn_size"]
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][i] for i in kept_layers]
    try:
        return type(config).from_dict(d)
    except Exception as e:  # the config class's own validation (transformers' strict dataclasses)
        raise ValueError(f"{type(config).__name__} refuses the target shape {shape}: {str(e).splitlines()[0]}") from e


def parameter_count(config, target: PruneTarget) -> int:
    """Exact parameter count of the student a target gives, from the config alone."""
    return count_parameters(student_config(config, target))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (keeps weight layout stable)."""
    return torch.topk(scores.float(), k).indices.sort().values


def _pairs(kept: torch.Tensor, pruned: torch.Tensor, scores: torch.Tensor) -> list[tuple[int, int]]:
    """Section 2.3 pairing: least important kept unit with most important pruned one, and so on."""
    kept_order = kept[scores[kept].argsort()]
    pruned_order = pruned[scores[pruned].argsort(descending=True)]
    return [(int(a), int(b)) for a, b in zip(kept_order, pruned_order)]


def _select_layers(scores: ImportanceScores, n_layers: int, target: PruneTarget, metric: str) -> list[int]:
    if target.drop_layers is not None:
        return [i for i in range(n_layers) if i not in set(target.drop_layers)]
    n_keep = n_layers if target.num_layers is None else target.num_layers
    n_drop = n_layers - n_keep
    if n_drop == 0:
        return list(range(n_layers))
    if metric in ("bi-run", "ppl-run"):
        if metric == "ppl-run" and n_drop not in scores.meta.get("depth_ppl_runs", []):
            raise ValueError(f"depth_metric ppl-run drops a run of {n_drop} layers, but the importance scores have "
                             f"perplexity-drop runs {scores.meta.get('depth_ppl_runs') or 'none'}; re-run importance "
                             f"with --depth-ppl-runs {n_drop} (and --depth-ppl-samples > 0)")
        run = scores.perplexity_increase(n_drop) if metric == "ppl-run" else scores.block_importance(n_drop)
        start = int(run.argmin())
        return [i for i in range(n_layers) if not start <= i < start + n_drop]
    if metric not in DEPTH_METRICS:
        raise ValueError(f"unknown depth metric {metric!r}; choose from {', '.join(DEPTH_METRICS)}")
    dropped = set(torch.topk(scores.layer_scores(metric), n_drop, largest=False).indices.tolist())
    return [i for i in range(n_layers) if i not in dropped]


def _select_heads(s: torch.Tensor, heads: int, kv: int, new_heads: int, new_kv: int, merge: bool):
    """Kept query heads and KV groups of one layer, the same count per group; merge pairs when asked."""
    group = heads // kv
    by_group = s.view(kv, group)
    groups = _top(by_group.sum(1), new_kv)
    per_group = new_heads // new_kv
    kept, head_pairs = [], []
    for g in groups.tolist():
        in_group = torch.arange(g * group, (g + 1) * group)
        keep = in_group[_top(by_group[g], per_group)]
        kept.append(keep)
        if merge and group > 1:
            head_pairs += _pairs(keep, in_group[~torch.isin(in_group, keep)], s)
    group_pairs = []
    if merge and group == 1:  # MHA: a head is a group; merge whole heads (q, k, v)
        all_groups = torch.arange(kv)
        group_pairs = _pairs(groups, all_groups[~torch.isin(all_groups, groups)], s)
        head_pairs = group_pairs
    return torch.cat(kept), groups, head_pairs, group_pairs


def plan_pruning(config, scores: ImportanceScores, target: PruneTarget,
                 options: PruneConfig | None = None) -> PrunePlan:
    """Decide every kept index from the scores; no weights are touched."""
    options = options or PruneConfig()
    shape = resolve_target(config, target)
    expected = scores.meta.get("shape", {})
    actual = {"hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
              "ffn_size": intermediate_size(config), "num_hidden_layers": config.num_hidden_layers}
    mismatch = {k: (expected.get(k), v) for k, v in actual.items() if expected.get(k) not in (None, v)}
    _check(not mismatch, f"importance scores were computed for another shape (scores vs teacher: {mismatch})")
    n_layers = config.num_hidden_layers
    layers = _select_layers(scores, n_layers, target, options.depth_metric)
    aggs = (options.batch_agg, options.seq_agg)
    heads_s, ffn_s = scores.heads(*aggs, score=options.head_score), scores.neurons(*aggs)
    plan = PrunePlan(student_config(config, target, layers), layers, _top(scores.channels(*aggs), shape["hidden_size"]))
    heads, kv = config.num_attention_heads, num_kv_heads(config)
    for t in layers:
        kept, groups, head_pairs, group_pairs = _select_heads(
            heads_s[t], heads, kv, shape["num_heads"], shape["num_kv_heads"], options.merge_heads)
        plan.heads.append(kept)
        plan.groups.append(groups)
        plan.head_merges.append(head_pairs)
        plan.group_merges.append(group_pairs)
        plan.ffn.append(_top(ffn_s[t], shape["ffn_size"]))
    return plan


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units (heads of `size` rows)."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


def _merge(value: torch.Tensor, teacher: torch.Tensor, pairs, kept: torch.Tensor, d: int,
           offset: int, teacher_offset: int) -> None:
    """Head_k <- Head_k + (Head_k - Head_p) on the rows of a sliced weight (paper section 2.3)."""
    position = {int(u): i for i, u in enumerate(kept)}
    for k, p in pairs:
        rows = slice(offset + position[k] * d, offset + (position[k] + 1) * d)
        source = slice(teacher_offset + p * d, teacher_offset + (p + 1) * d)
        value[rows] = 2 * value[rows] - teacher[source]


def _copy_layer(spec, t_layer, s_layer, plan: PrunePlan, i: int, d: int, heads: int, kv: int) -> None:
    ffn_t = t_layer.get_submodule(f"{spec.mlp}.{spec.down_proj}").in_features
    q_rows, kv_rows = _rows(plan.heads[i], d), _rows(plan.groups[i], d)
    idx = {"hidden": plan.hidden, "q": q_rows, "kv": kv_rows, "ffn": plan.ffn[i],
           "qkv": torch.cat([q_rows, heads * d + kv_rows, (heads + kv) * d + kv_rows]),
           "ffn2": torch.cat([plan.ffn[i], ffn_t + plan.ffn[i]])}
    new_q, new_kv = len(plan.heads[i]) * d, len(plan.groups[i]) * d
    covered = set()
    for name, (row_axis, col_axis) in spec.layer_axes().items():
        t_mod, s_mod = t_layer.get_submodule(name), s_layer.get_submodule(name)
        for pname, s_param in s_mod.named_parameters(recurse=False):
            teacher = getattr(t_mod, pname).detach()
            if col_axis and teacher.dim() == 2:
                teacher = teacher.index_select(1, idx[col_axis].to(teacher.device))
            value = teacher.index_select(0, idx[row_axis].to(teacher.device)) if row_axis else teacher
            if name in spec.query_weight_names():
                _merge(value, teacher, plan.head_merges[i], plan.heads[i], d, 0, 0)
                if row_axis == "qkv":  # MHA group merges also apply to the fused k and v rows
                    for off_s, off_t in ((new_q, heads * d), (new_q + new_kv, (heads + kv) * d)):
                        _merge(value, teacher, plan.group_merges[i], plan.groups[i], d, off_s, off_t)
            elif name in spec.kv_weight_names():
                _merge(value, teacher, plan.group_merges[i], plan.groups[i], d, 0, 0)
            copy_into(s_param, value)
            covered.add(f"{name}.{pname}")
    missing = {n for n, _ in s_layer.named_parameters()} - covered
    _check(not missing, f"{spec.model_types[0]} layer has parameters the pruner does not know: {sorted(missing)}")


def _copy_embedding(spec, teacher, student, plan: PrunePlan) -> None:
    """The student's embedding matrix: the teacher's kept channels (`prune_stream.py` calls it on one module)."""
    embed = teacher.get_submodule(spec.embed).weight
    embed = embed.index_select(1, plan.hidden.to(embed.device))
    if spec.scaled_embedding and not getattr(plan.config, "tie_word_embeddings", False):
        # keep sqrt(hidden) * E equal to the teacher's on the kept channels (a tied matrix would also scale logits)
        embed = embed * (teacher.config.hidden_size / plan.config.hidden_size) ** 0.5
    copy_into(student.get_submodule(spec.embed).weight, embed)


def _copy_head(spec, teacher, student, plan: PrunePlan) -> None:
    """The student's final norm and, when untied, its LM head: the teacher's kept channels."""
    norm = teacher.get_submodule(spec.final_norm)
    hidden = plan.hidden.to(next(norm.parameters()).device)
    if not getattr(plan.config, "tie_word_embeddings", False):
        copy_into(student.get_submodule(spec.lm_head).weight, teacher.get_submodule(spec.lm_head).weight[:, hidden])
    for pname, param in student.get_submodule(spec.final_norm).named_parameters():
        copy_into(param, getattr(norm, pname)[hidden])


@torch.no_grad()
def build_student(teacher, plan: PrunePlan):
    """A new model of the plan's config, filled with the teacher's sliced (and merged) tensors."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    spec = get_arch(teacher.config)
    with no_init_weights():
        student = AutoModelForCausalLM.from_config(plan.config, dtype=teacher.dtype)
    student.tie_weights()  # skipped with the weight init; tied heads must share the embedding tensor
    device = next(teacher.parameters()).device
    student.to(device)
    _copy_embedding(spec, teacher, student, plan)
    _copy_head(spec, teacher, student, plan)
    t_layers, s_layers = spec.decoder_layers(teacher), spec.decoder_layers(student)
    d, heads, kv = head_dim(teacher.config), teacher.config.num_attention_heads, num_kv_heads(teacher.config)
    for i, t in enumerate(plan.layers):
        _copy_layer(spec, t_layers[t], s_layers[i], plan, i, d, heads, kv)
    if teacher.generation_config is not None:
        student.generation_config = teacher.generation_config
    student.eval()
    return student


def prune_model(teacher, scores: ImportanceScores, target: PruneTarget, options: PruneConfig | None = None):
    """Teacher + scores + target shape -> pruned `PreTrainedModel` (in memory) and its plan."""
    plan = plan_pruning(teacher.config, scores, target, options)
    return build_student(teacher, plan), plan


def plan_summary(plan: PrunePlan, target: PruneTarget, options: PruneConfig, teacher_config) -> dict:
    """What to record next to the weights: target, kept layers, parameter counts."""
    return {
        "target": asdict(target),
        "options": asdict(options),
        "kept_layers": plan.layers,
        "teacher_parameters": count_parameters(teacher_config),
        "student_parameters": count_parameters(plan.config),
    }


def save_student(student, out: str | Path, tokenizer=None, info: dict | None = None) -> None:
    """safetensors weights, config, generation config, tokenizer (with its chat template), pruning.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if info is not None:
        (out / PRUNING_FILE).write_text(json.dumps(info, indent=2) + "\n")


def check_output(out: str | Path, overwrite: bool) -> None:
    path = Path(out)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} is not empty; choose another, or pass --overwrite")


def run_prune(model, tokenizer, scores: ImportanceScores | str | Path, target: PruneTarget, config: PruneConfig,
              out: str | Path, info: dict | None = None, adapter: str | Path | None = None, dtype: str | None = None,
              device: str = "cpu") -> StageOutput:
    """Prune the teacher to `target` and save it to `out` (written whole, then moved: never half a folder).

    The entry point of `hf-minitron prune` and the build's prune stage. `model`: a loaded teacher, or a
    `ModelSource` (`models.resolve_source`), streamed (`prune_stream.py`) or loaded here in `dtype` on `device` as
    `config.mode` says; `adapter`: a search winner's LoRA adapter merged into the pruned weights first (in memory).
    `info` joins the plan in pruning.json.
    """
    import shutil

    from .models import load_config, load_model
    from .prune_stream import use_stream, write_student

    if not isinstance(scores, ImportanceScores):
        scores = ImportanceScores.load(scores)
    stream = use_stream(config.mode, model, adapter)
    if not stream and not isinstance(model, torch.nn.Module):
        model = load_model(model, dtype=dtype, device=device)
    teacher_config = load_config(model) if stream else model.config
    plan = plan_pruning(teacher_config, scores, target, config)
    info = {**(info or {}), "search_adapter_merged": adapter is not None,
            **plan_summary(plan, target, config, teacher_config)}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if stream:
        write_student(model, plan, tmp, tokenizer, info, dtype)
    else:
        student = build_student(model, plan)
        if adapter is not None:
            from .search import merge_adapter

            student = merge_adapter(student, adapter)
        save_student(student, tmp, tokenizer, info)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return StageOutput(out, hash_folder(out), record={"parameters": info["student_parameters"]})
