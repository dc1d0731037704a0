"""The plan a build prints before it loads any weights: what it will make and what that will cost here.

One row per stage: the member, the model it runs on (a shape, or the search's candidates for a budget), its
parameters, tokens, FLOPs (the same formulas `cost.py` records afterwards) and the disk its outputs take. The wall
time is an estimate: the FLOPs over a throughput measured on this machine by timing real forward/backward steps of
teacher-shaped models (random weights, from the config alone): the time of a layer and of the vocabulary's part,
added up to the teacher's depth, for each kind of work a stage does (forward passes, training steps, distillation
steps with their logit loss over the vocabulary); model loading, tokenization and saving are not in it.
`hf-minitron build --dry-run` prints it and stops.
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
    work: dict[str, int] | None  # FLOPs by kind of work (WORK), each timed at its own measured rate
    disk: int = 0  # bytes its outputs leave in the run folder
    low_work: dict[str, int] | None = None  # the search: when the ranking settles at the earliest evaluation it can
    slowdown: float = 1.0  # time its FLOPs do not show: steps that decode token by token (on-policy, unlikelihood)

    def seconds(self, calibration, low: bool = False) -> float | None:
        """Its estimated wall time: its FLOPs (the search's fewest with `low`) at the calibrated rates."""
        t = calibration.seconds(self.low_work if low and self.low_work is not None else self.work)
        return None if t is None else t * self.slowdown

    @property
    def flops(self) -> int | None:
        return None if self.work is None else sum(self.work.values())

    @property
    def low_flops(self) -> int | None:
        return None if self.low_work is None else sum(self.low_work.values())


@dataclass
class Calibration:
    """Throughputs measured here, FLOPs per second of a teacher-shaped model for each kind of work (WORK)."""

    rates: dict[str, float]
    basis: str

    def seconds(self, work: dict[str, int] | None) -> float | None:
        return None if work is None else sum(f / self.rates[kind] for kind, f in work.items())


WORK = ("forward", "train", "distill")  # forward passes (2 N per token); training steps (6 N); distillation
# steps (6 N of the student + 2 N of its teacher, then the logit loss over the vocabulary)


def _work(kind: str, flops: int | None) -> dict[str, int] | None:
    return None if flops is None else {kind: flops}


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
    from .teacher_cache import bytes_per_token

    configs = {TEACHER: teacher_config or recipe.teacher.model_config()}
    n = {TEACHER: count_parameters(configs[TEACHER])}
    size = _bytes_per_param(recipe, configs[TEACHER])
    rows: list[Row] = []
    if recipe.teacher_correction.get("tokens"):
        t = recipe.teacher_correction["tokens"]
        rows.append(Row(TEACHER, "correction", _shape(configs[TEACHER]), n[TEACHER], t,
                        _work("train", train_flops(n[TEACHER], t)),
                        n[TEACHER] * size))
    ev = recipe.evaluate.seq_len * (recipe.evaluate.windows or 0) or None
    if recipe.evaluate.teacher:
        rows.append(Row(TEACHER, "evaluate", _shape(configs[TEACHER]), n[TEACHER], ev,
                        _work("forward", ev and forward_flops(n[TEACHER], ev))))
    scored = set()
    for m in recipe.members:
        base = m.base
        if base not in scored:  # importance once per base model
            scored.add(base)
            imp = needed_passes(recipe, [x for x in recipe.members if x.base == base])
            t = imp.samples * imp.seq_len
            rows.append(Row(base, "importance", _shape(configs[base]), n[base], t,
                            _work("forward", forward_flops(n[base], t))))
        kd = m.kd_teacher
        if kd not in n:
            n[kd] = count_parameters(load_config(kd))
        cache = cache_need(recipe, m)
        cached, shared, need = cache["mode"] == "auto", cache["shared"], cache["tokens"]
        if cached:  # the teacher's forward passes, once, to disk; the search and distillation then skip them
            k = cache["top_k"]
            per_token = bytes_per_token(k, configs[TEACHER].vocab_size)  # at most: top_p keeps fewer
            kept = f"top-{k}" + (f" (p {cache['top_p']})" if cache["top_p"] else "")
            rows.append(Row(m.name, "teacher-logits", f"{kept} of {kd}", n[kd], need,
                            _work("forward", forward_flops(n[kd], need)),
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
            step = "distill" if n_kd else "train"
            work = [{step: sum(train_flops(c.params, stops[k - 1] * per_step, n_kd) for c in found) if k else 0,
                     "forward": sum(forward_flops(c.params, (k + 1) * score_tokens) for c in found)}  # scored once
                    for k in (earliest, len(stops))]  # pruned, then after each interval (none: tokens 0)
            rows.append(Row(m.name, "search", f"{len(found)} candidates ({min(c.params for c in found) / 1e6:.1f}-"
                            f"{max(c.params for c in found) / 1e6:.1f}M)", m.params,
                            (stops[-1] if stops else 0) * per_step * len(found), work[1], low_work=work[0]))
            model = f"e.g. {_shape(configs[m.name])}"
        n[m.name] = count_parameters(configs[m.name])
        weights = n[m.name] * size
        rows.append(Row(m.name, "prune", model, n[m.name], 0, {}, weights))
        t = recipe.distill_tokens(m)
        rows.append(Row(m.name, "distill", model, n[m.name], t,
                        _work("train" if cached else "distill", train_flops(n[m.name], t, 0 if cached else n[kd])),
                        weights, slowdown=decoding_slowdown(recipe, m)))
        evaluated = [m.name]
        if m.instruct:
            steps = recipe.sft.get("max_steps", -1)
            sft_tokens = steps * recipe.sft.get("per_device_train_batch_size", 8) * \
                recipe.sft.get("max_length", 1024) if steps and steps > 0 else None
            rows.append(Row(m.name + INSTRUCT_SUFFIX, "sft", model, n[m.name], sft_tokens,
                            _work("train", sft_tokens and train_flops(n[m.name], sft_tokens)), weights))
            evaluated.append(m.name + INSTRUCT_SUFFIX)
        for name in evaluated:
            rows.append(Row(name, "evaluate", model, n[m.name], ev,
                            _work("forward", ev and forward_flops(n[m.name], ev))))
    return rows


def _step_seconds(config, kind: str, batch: int, window: int, device: str, dtype, distill: dict,
                  repeats: int = TIMED_STEPS) -> float:
    """The median of `repeats` timed steps of `kind` (WORK) on a random model of `config`, after a small warm-up
    step (one step alone varied by 40% between two runs on an idle 2-core machine). Training steps include the
    AdamW update; distillation steps the teacher's forward and the build's logit loss (`chunked_logit_losses`
    with the recipe's loss, temperature, top-k and chunking); both under bf16 autocast when the build's training
    will be (`distill["bf16"]`)."""
    import contextlib
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from .losses import chunked_logit_losses

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).train(kind != "forward")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7) if kind != "forward" else None
    teacher = None
    if kind == "distill":
        teacher = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval().requires_grad_(False)
    none = torch.empty(0, dtype=torch.long, device=device)

    def step(x):
        if kind == "forward":
            with torch.no_grad():
                return model(input_ids=x, labels=x)
        if kind == "train":
            model(input_ids=x, labels=x).loss.backward()
        else:
            h = model(input_ids=x, use_cache=False, output_hidden_states=True, logits_to_keep=none).hidden_states[-1]
            with torch.no_grad():
                t = teacher(input_ids=x, use_cache=False, output_hidden_states=True,
                            logits_to_keep=none).hidden_states[-1]
            kd, ce = chunked_logit_losses(
                h[:, :-1].flatten(0, 1), t[:, :-1].flatten(0, 1), x[:, 1:].flatten(), model.get_output_embeddings(),
                teacher.get_output_embeddings(), kind=distill["logit_loss"], temperature=distill["temperature"],
                top_k=distill["top_k"], chunk_tokens=distill["kd_chunk_tokens"], with_ce=distill["w_clm"] != 0)
            ((kd + distill["w_clm"] * ce) / x[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ids = torch.randint(0, config.vocab_size, (batch, window), device=device)
    times = []
    autocast = kind != "forward" and distill.get("bf16")
    for part in (ids[:1, :64], *[ids] * repeats):  # warm-up, then the timed steps
        t0 = time.perf_counter()
        with torch.autocast(device.split(":")[0], torch.bfloat16) if autocast else contextlib.nullcontext():
            step(part)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def calibrate(recipe, config) -> Calibration:
    """Throughputs of this machine on the teacher's shapes, at the distillation's batch and window (at most 2,048
    tokens), on the teacher's device and dtype, for each kind of work: a step of 4 of its layers with a small
    vocabulary gives the time per layer, a step of 1 layer with its whole vocabulary the embeddings, LM head and
    loss; the teacher's step is the head plus its depth times a layer, and its FLOPs over that step the rate (a
    distillation step: the teacher distilling into a copy of itself, 6 N + 2 N per token)."""
    import torch

    from .archs import count_parameters
    from .models import DTYPES, resolve_device
    from .prune import PruneTarget, student_config
    from .training import effective_bf16

    device = resolve_device(recipe.teacher.device)
    dtype = DTYPES.get(recipe.teacher.dtype or "float32", torch.float32)
    window = min(recipe.distill.get("max_length") or 1024, 1024)
    batch = max(1, min(recipe.distill.get("per_device_train_batch_size", 8), 2048 // window))  # the build's step
    depth, n = config.num_hidden_layers, count_parameters(config)
    deep = student_config(config, PruneTarget(num_layers=min(4, depth)))
    deep.vocab_size, deep.pad_token_id = 256, None  # the layers' time, without the vocabulary's
    shallow = student_config(config, PruneTarget(num_layers=1))
    settings = {k: recipe.distill_setting(k)  # the build's logit loss
                for k in ("logit_loss", "temperature", "top_k", "kd_chunk_tokens", "w_clm")}
    settings["bf16"] = effective_bf16(recipe.distill.get("bf16"), recipe.distill.get("fp16", False))
    rates, parts = {}, []
    for kind, flops_per_token in zip(WORK, (2 * n, 6 * n, 8 * n)):
        layer = _step_seconds(deep, kind, batch, window, device, dtype, settings) / deep.num_hidden_layers
        head = max(_step_seconds(shallow, kind, batch, window, device, dtype, settings) - layer, 0.0)
        step = head + depth * layer
        rates[kind] = flops_per_token * batch * window / step
        parts.append(f"{kind} {layer:.2f} s per layer + {head:.2f} s = {step:.1f} s, {si(rates[kind])}FLOP/s")
    precision = str(dtype).replace("torch.", "") + (", training under bf16 autocast" if settings["bf16"] else "")
    return Calibration(rates, f"steps of {batch} x {window} tokens timed on random models of the teacher's shapes "
                              f"({device}, {precision}), a layer's time and the embeddings', LM head's and loss's, "
                              f"added up to its {depth} layers: " + "; ".join(parts))


def format_plan(recipe, rows: list[Row], calibration: Calibration | None) -> str:
    """The table and the totals: FLOPs, disk and, with a calibration, the estimated wall time."""
    w, sw = max(len(r.member) for r in rows) + 2, max(len(r.stage) for r in rows) + 2
    lines = [f"plan: family {recipe.name!r} from {recipe.teacher.source}",
             f"{'model':<{w}}{'stage':<{sw}}{'shape (hidden/ffn/heads/kv/layers)':<36}{'params':>8}{'tokens':>9}"
             f"{'FLOPs':>9}{'disk':>9}{'time':>9}"]
    for r in rows:
        t = r.seconds(calibration) if calibration else None
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
    distilled = [m for m in recipe.members if any(r.stage == "distill" and r.member == m.name for r in rows)]
    on = [m for m in distilled if recipe.distill_setting("on_policy", m)]
    if on:
        prompt = recipe.distill_setting("on_policy_prompt", on[0])
        lines.append(f"distill.on_policy {_members_values(recipe, on, 'on_policy')}: that share of the distillation "
                     f"steps first samples each window past its first {prompt} tokens with the student, token by "
                     f"token: in the time estimate at {1 + ON_POLICY_EXTRA:g}x an off-policy step (as measured on "
                     f"the quickstart's 70m)")
    ul = [m for m in distilled if recipe.distill_setting("unlikelihood", m)]
    if ul:
        lines.append(f"distill.unlikelihood {_members_values(recipe, ul, 'unlikelihood')}: that share of the "
                     f"distillation steps also decodes {recipe.distill_setting('unlikelihood_tokens', ul[0])} greedy "
                     f"tokens per window and runs one more forward: in the time estimate at "
                     f"{1 + UNLIKELIHOOD_EXTRA:g}x a plain step (as measured on the quickstart's 70m)")
    if calibration:
        high = sum(r.seconds(calibration) or 0 for r in rows)
        low = sum(r.seconds(calibration, low=True) or 0 for r in rows)
        lines.append(f"estimated wall time on this machine: ~{_duration((low + high) / 2)} (from {_duration(low)} if "
                     f"every search ranking settles at once to {_duration(high)} for its whole budget)")
        lines.append(f"  an estimate: the FLOPs above at the throughputs measured just now, {calibration.basis}; "
                     "loading, tokenizing and saving are not in it")
    return "\n".join(lines)


# what a step that decodes token by token costs beyond a plain distillation step, measured on the quickstart's 70m
# (bench/RESULTS.md): an on-policy step (224 sampled tokens per window) 3.5x; an unlikelihood step (64 greedy tokens
# per window, one more forward and backward) 1.9x (the build's 63 steps in 455 s against 47 plain ones in 181 s)
ON_POLICY_EXTRA = 2.5
UNLIKELIHOOD_EXTRA = 0.9


def decoding_slowdown(recipe, m) -> float:
    """How much longer member `m`'s distillation takes than its FLOPs say: its share of decoding steps."""
    return (1 + ON_POLICY_EXTRA * recipe.distill_setting("on_policy", m)
            + UNLIKELIHOOD_EXTRA * recipe.distill_setting("unlikelihood", m))


def _members_values(recipe, members, key: str) -> str:
    """"0.25" when every member given has that value of distill `key`, else "0.25 (a), 0.5 (b)"."""
    values = [recipe.distill_setting(key, m) for m in members]
    if len(set(values)) == 1 and len(members) == len(recipe.members):
        return f"{values[0]:g}"
    return ", ".join(f"{v:g} ({m.name})" for v, m in zip(values, members))


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
    # a student's and a teacher's weights, gradients, Adam moments, activations:
    need = n * (BYTES.get(recipe.teacher.dtype or "float32", 4) + 4) * 3
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
