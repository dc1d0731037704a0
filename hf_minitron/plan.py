"""The plan a build prints before it loads any weights: what it will make and what that will cost here.

One row per stage: the member, the model it runs on (a shape, or the search's candidates for a budget), its
parameters, tokens, FLOPs (the same formulas `cost.py` records afterwards) and the disk its outputs take. The wall
time is an estimate: the FLOPs over a throughput measured on this machine by timing real forward/backward steps of
teacher-shaped models (random weights, from the config alone): the time of a layer and of the vocabulary's part,
added up to the teacher's depth; model loading, tokenization and saving are not in it. `hf-minitron build
--dry-run` prints it and stops.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .cost import forward_flops, si, train_flops
from .rundir import INSTRUCT_SUFFIX, TEACHER

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_BYTES = 12  # fp32 master weights (4) + two Adam moments (8) per parameter in a trainer checkpoint
TIMED_STEPS = 3  # timed steps per calibration model (their median)


@dataclass
class Row:
    """One stage of the plan."""

    member: str
    stage: str
    model: str  # shape "hidden/ffn/heads/kv/layers", or "N candidates ..."
    params: int
    tokens: int | None  # None: not known before the data is read (SFT epochs)
    flops: int | None
    disk: int = 0  # bytes its outputs leave in the run folder
    low_flops: int | None = None  # the search: when the ranking settles at the earliest evaluation it can


@dataclass
class Calibration:
    """Training throughput measured here: FLOPs (6 N per token) per second of a teacher-shaped model."""

    flops_per_s: float
    basis: str


def _shape(config) -> str:
    from .archs import intermediate_size, num_kv_heads

    return "/".join(str(v) for v in (config.hidden_size, intermediate_size(config), config.num_attention_heads,
                                       num_kv_heads(config), config.num_hidden_layers))


def _bytes_per_param(recipe, config) -> int:
    dtype = recipe.teacher.dtype or str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    return BYTES.get(dtype, 4)


def plan_rows(recipe, teacher_config=None) -> list[Row]:
    """Every stage a build of `recipe` runs, with its size and cost, from configs alone (a chain member's base is
    its parent's nearest search candidate, as in the dry run)."""
    from .archs import count_parameters
    from .models import load_config
    from .build_stages import cache_need, needed_passes
    from .prune import student_config
    from .search import candidates_for, eval_steps

    configs = {TEACHER: teacher_config or recipe.teacher.model_config()}
    n = {TEACHER: count_parameters(configs[TEACHER])}
    size = _bytes_per_param(recipe, configs[TEACHER])
    rows: list[Row] = []
    if recipe.teacher_correction.get("tokens"):
        t = recipe.teacher_correction["tokens"]
        rows.append(Row(TEACHER, "correction", _shape(configs[TEACHER]), n[TEACHER], t, train_flops(n[TEACHER], t),
                        n[TEACHER] * size))
    ev = recipe.evaluate.seq_len * (recipe.evaluate.windows or 0) or None
    if recipe.evaluate.teacher:
        rows.append(Row(TEACHER, "evaluate", _shape(configs[TEACHER]), n[TEACHER], ev,
                        ev and forward_flops(n[TEACHER], ev)))
    scored = set()
    for m in recipe.members:
        base = m.base
        if base not in scored:  # importance once per base model
            scored.add(base)
            imp = needed_passes(recipe, [x for x in recipe.members if x.base == base])
            t = imp.samples * imp.seq_len
            rows.append(Row(base, "importance", _shape(configs[base]), n[base], t, forward_flops(n[base], t)))
        kd = m.kd_teacher
        if kd not in n:
            n[kd] = count_parameters(load_config(kd))
        cache = cache_need(recipe, m)
        cached, shared, need = cache["mode"] == "auto", cache["shared"], cache["tokens"]
        if cached:  # the teacher's forward passes, once, to disk; the search and distillation then skip them
            k = cache["top_k"]
            per_token = (k + 1) * (2 if configs[TEACHER].vocab_size <= 1 << 16 else 4) + 2 * (k + 1)
            rows.append(Row(m.name, "teacher-logits", f"top-{k} of {kd}", n[kd], need, forward_flops(n[kd], need),
                            need * per_token))
        if m.shape:
            configs[m.name] = student_config(configs[base], m.shape)
            model = _shape(configs[m.name])
        else:
            search = m.search_settings(recipe.search)
            found = candidates_for(configs[base], m.params, search)
            configs[m.name] = student_config(configs[base], found[0].target())
            stops, per_step = eval_steps(search)
            score_tokens = search.eval_windows * search.eval_seq_len
            earliest = min(len(stops), max(1, search.stable_evals))  # settled() needs this many unchanged rankings

            n_kd = 0 if cached and shared else n[kd]
            flops = [sum(train_flops(c.params, stops[k - 1] * per_step, n_kd)  # scored once pruned, then after
                         + forward_flops(c.params, (k + 1) * score_tokens) for c in found)  # each interval
                     for k in (earliest, len(stops))]
            rows.append(Row(m.name, "search", f"{len(found)} candidates ({min(c.params for c in found) / 1e6:.1f}-"
                            f"{max(c.params for c in found) / 1e6:.1f}M)", m.params,
                            stops[-1] * per_step * len(found), flops[1], low_flops=flops[0]))
            model = f"e.g. {_shape(configs[m.name])}"
        n[m.name] = count_parameters(configs[m.name])
        weights = n[m.name] * size
        rows.append(Row(m.name, "prune", model, n[m.name], 0, 0, weights))
        t = recipe.distill_tokens(m)
        rows.append(Row(m.name, "distill", model, n[m.name], t, train_flops(n[m.name], t, 0 if cached else n[kd]),
                        weights))
        evaluated = [m.name]
        if m.instruct:
            steps = recipe.sft.get("max_steps", -1)
            sft_tokens = steps * recipe.sft.get("per_device_train_batch_size", 8) * \
                recipe.sft.get("max_length", 1024) if steps and steps > 0 else None
            rows.append(Row(m.name + INSTRUCT_SUFFIX, "sft", model, n[m.name], sft_tokens,
                            sft_tokens and train_flops(n[m.name], sft_tokens), weights))
            evaluated.append(m.name + INSTRUCT_SUFFIX)
        for name in evaluated:
            rows.append(Row(name, "evaluate", model, n[m.name], ev, ev and forward_flops(n[m.name], ev)))
    return rows


def _step_seconds(config, batch: int, window: int, device: str, dtype, repeats: int = TIMED_STEPS) -> float:
    """The median of `repeats` timed forward/backward steps of a random model of `config`, after a small warm-up
    step (one step alone varied by 40% between two runs on an idle 2-core machine)."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).train()
    ids = torch.randint(0, config.vocab_size, (batch, window), device=device)
    times = []
    for part in (ids[:1, :64], *[ids] * repeats):  # warm-up, then the timed steps
        t0 = time.perf_counter()
        model(input_ids=part, labels=part).loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def calibrate(recipe, config) -> Calibration:
    """Throughput of this machine on the teacher's shapes, at the distillation's batch and window (at most 2,048
    tokens), on the teacher's device and dtype: a step of 4 of its layers with a small vocabulary gives the time per
    layer, a step of 1 layer with its whole vocabulary the embeddings, LM head and loss; the teacher's step is the
    head plus its depth times a layer, and FLOPs (6 N per token) over that step the rate."""
    import torch

    from .archs import count_parameters
    from .models import DTYPES, resolve_device
    from .prune import PruneTarget, student_config

    device = resolve_device(recipe.teacher.device)
    dtype = DTYPES.get(recipe.teacher.dtype or "float32", torch.float32)
    window = min(recipe.distill.get("max_length") or 1024, 1024)
    batch = max(1, min(recipe.distill.get("per_device_train_batch_size", 8), 2048 // window))  # the build's step
    depth = config.num_hidden_layers
    deep = student_config(config, PruneTarget(num_layers=min(4, depth)))
    deep.vocab_size, deep.pad_token_id = 256, None  # the layers' time, without the vocabulary's
    layer = _step_seconds(deep, batch, window, device, dtype) / deep.num_hidden_layers
    head = max(_step_seconds(student_config(config, PruneTarget(num_layers=1)), batch, window, device, dtype)
               - layer, 0.0)
    step = head + depth * layer
    rate = 6 * count_parameters(config) * batch * window / step
    return Calibration(rate, f"one forward+backward step of {batch} x {window} tokens timed on random models of "
                             f"the teacher's shapes ({device}, {str(dtype).replace('torch.', '')}): {layer:.2f} s per "
                             f"layer, {head:.2f} s for embeddings, LM head and loss, so {step:.1f} s for its {depth} "
                             f"layers: {si(rate)}FLOP/s")


def format_plan(recipe, rows: list[Row], calibration: Calibration | None) -> str:
    """The table and the totals: FLOPs, disk and, with a calibration, the estimated wall time."""
    w, sw = max(len(r.member) for r in rows) + 2, max(len(r.stage) for r in rows) + 2
    lines = [f"plan: family {recipe.name!r} from {recipe.teacher.source}",
             f"{'model':<{w}}{'stage':<{sw}}{'shape (hidden/ffn/heads/kv/layers)':<36}{'params':>8}{'tokens':>9}"
             f"{'FLOPs':>9}{'disk':>9}{'time':>9}"]
    for r in rows:
        t = r.flops / calibration.flops_per_s if calibration and r.flops is not None else None
        lines.append(f"{r.member:<{w}}{r.stage:<{sw}}{r.model:<36}{si(r.params):>8}{si(r.tokens):>9}"
                     f"{_big(r.flops):>9}{_bytes(r.disk):>9}{_duration(t):>9}")
    flops = sum(r.flops or 0 for r in rows)
    peak = max((r.params * ADAM_BYTES * 2 for r in rows if r.stage in ("distill", "sft")), default=0)
    cached = sum(r.disk for r in rows if r.stage == "teacher-logits")
    what = f"of weights and teacher logits ({_bytes(cached)})" if cached else "of weights"
    lines.append(f"total: ~{_big(flops)} FLOPs; disk ~{_bytes(sum(r.disk for r in rows))} {what} (+ up to "
                 f"{_bytes(peak)} of training checkpoints while a member trains)")
    if any(r.tokens is None and r.stage == "sft" for r in rows):
        lines.append("SFT runs epochs of data.sft, whose size is known only once read: not in the totals")
    if calibration:
        high = flops / calibration.flops_per_s
        low = sum(r.low_flops if r.low_flops is not None else r.flops or 0 for r in rows) / calibration.flops_per_s
        lines.append(f"estimated wall time on this machine: ~{_duration((low + high) / 2)} (from {_duration(low)} if "
                     f"every search ranking settles at once to {_duration(high)} for its whole budget)")
        lines.append(f"  an estimate: the FLOPs above at the throughput measured just now, {calibration.basis}; "
                     "loading, tokenizing and saving are not in it")
    return "\n".join(lines)


def _big(x: int | None) -> str:
    """si() up to T, then powers of ten (FLOPs of real builds reach 1e20)."""
    return si(x) if x is None or x < 1e15 else f"{x:.2g}".replace("+", "")


def _bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B" if n else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measure(recipe, config) -> tuple[Calibration | None, str | None]:
    """(calibration, None), or (None, why not): the teacher's device is not here, or a 2-layer model of its
    shapes would not fit in a quarter of the free memory."""
    import torch

    from .archs import count_parameters
    from .prune import PruneTarget, student_config

    device = recipe.teacher.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        return None, f"the teacher's device {device} is not on this machine"
    n = count_parameters(student_config(config, PruneTarget(num_layers=min(2, config.num_hidden_layers))))
    need = n * (BYTES.get(recipe.teacher.dtype or "float32", 4) + 4) * 2  # weights, gradients, activations
    if device == "cpu" or not torch.cuda.is_available():
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        free = torch.cuda.mem_get_info()[0]
    if need > free / 4:
        return None, f"a 2-layer model of the teacher's shapes ({_bytes(need)}) is too large to time here"
    return calibrate(recipe, config), None


def print_plan(recipe, log=print, config=None, timing: bool = True) -> str:
    """Compute, print (through `log`) and return the plan; `config`: the teacher's, already read; `timing=False`:
    no time estimate."""
    config = config or recipe.teacher.model_config()
    calibration, why = measure(recipe, config) if timing else (None, "not asked")
    text = format_plan(recipe, plan_rows(recipe, config), calibration)
    if why:
        text += f"\nno time estimate: {why}"
    log(text)
    return text
