"""Teacher-logit cache (issue 11): KD step speed and memory from the cache vs the live teacher, bytes per token and
write time for several K, and held-out perplexity after equal small KD budgets for each K vs full online KD.

Teacher: SmolLM2-135M-Instruct (GGUF, fp32). Student: every MLP pruned 1536 -> 1024 by activation importance (as in
bench/distill_recovery.py but from 8 x 128 calibration tokens; saved once under OUT_DIR/pruned). Data:
tiny-shakespeare + WikiText-2 valid, the first --cache-tokens tokens cut into --seq-len windows (the cache's windows;
the live runs train on the very same windows). Held-out perplexity: the first --test-windows x 512 windows of
WikiText-2 test, compared with full KD window by window (mean log-perplexity difference +- its standard error).

1. write: one cache per K (--ks), timed, against the teacher's plain forward (`.logits`) over the same windows
   (measured before and after the writes); bytes per scored token on disk.
2. step: KD steps (compute_loss + backward, no optimizer) in fresh child processes, live teacher vs the K=--step-k
   cache, alternated --reps times; tokens/s and peak RSS of each child.
3. quality (--kd-tokens > 0): distill the same pruned student for --kd-tokens tokens with full online KD and from
   each K's cache (same windows, order, schedule and seed), then held-out perplexity.

    nice -n 10 python bench/teacher_cache.py --cache-tokens 32768 --seq-len 256 --kd-tokens 16384
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_recovery import DATA_DIR, TEACHER, machine_line  # noqa: E402


def _rss_mb() -> float:
    """Peak RSS of this process image (VmHWM: ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _source(args):
    from hf_minitron.data import TextSource

    return TextSource(f"{args.data_dir}/tinyshakespeare.txt,{args.data_dir}/wikitext2_valid.txt")


def _cache_dir(args, k: int, top_p: float | None = None) -> str:
    return os.path.join(args.out_dir, f"cache_k{k}" + (f"_p{top_p}" if top_p else ""))


def _caches(args) -> list[tuple[str, int, float | None]]:
    """(arm name, K, top-P) of every cache: each K of --ks, then the largest K with each P of --top-ps."""
    return [(f"k{k}", k, None) for k in args.ks] + [(f"k{max(args.ks)}p{p}", max(args.ks), p) for p in args.top_ps]


def _load_teacher():
    from hf_minitron.models import load_model, load_tokenizer, resolve_source

    src = resolve_source(TEACHER)
    return load_model(src, dtype="float32"), load_tokenizer(src), src


@torch.no_grad()
def plain_forward_s(teacher, windows: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch):
        teacher(input_ids=windows[i:i + batch], use_cache=False).logits.sum().item()
    return time.perf_counter() - t0


def build_student(teacher, tokenizer, data_dir: str, out: str):
    """bench/distill_recovery.py's student (every MLP 1536 -> 1024 by activation importance) from 8 x 128
    calibration tokens instead of 32 x 256, to stay within memory on a shared machine."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distill_recovery import build_pruned

    build_pruned(teacher, tokenizer, data_dir, out, samples=8, seq_len=128)


# ---- 1. write ------------------------------------------------------------------------------------------------------
def bench_write(args, teacher, tok, src) -> dict:
    from hf_minitron.teacher_cache import TeacherCacheConfig, cache_windows, teacher_identity, write_teacher_cache

    windows = cache_windows(_source(args), tok, args.seq_len, args.cache_tokens, seed=TeacherCacheConfig().seed)
    tokens = windows.numel()
    before = plain_forward_s(teacher, windows, args.batch)
    rows = {}
    for name, k, top_p in _caches(args):
        folder = _cache_dir(args, k, top_p)
        if args.reuse and name in args.previous.get("write", {}).get("per_k", {}):
            rows[name] = args.previous["write"]["per_k"][name]
            print(f"WRITE {name}: read back from the previous results", flush=True)
            continue
        if os.path.isdir(folder):
            import shutil

            shutil.rmtree(folder)
        cfg = TeacherCacheConfig(max_tokens=args.cache_tokens, seq_len=args.seq_len, top_k=k, top_p=top_p,
                                 batch_size=args.batch)
        t0 = time.perf_counter()
        meta = write_teacher_cache(teacher, tok, _source(args), folder, cfg, identity=teacher_identity(src),
                                   progress=False)
        rows[name] = {"write_s": time.perf_counter() - t0, "bytes_per_token": meta["bytes_per_token"],
                      "bytes": meta["bytes"], "tokens": meta["tokens"]}
        print(f"WRITE {name}: {rows[name]['write_s']:.1f} s, {meta['bytes_per_token']} B/token, {meta['bytes']:,} B",
              flush=True)
    after = plain_forward_s(teacher, windows, args.batch)
    plain = (before + after) / 2
    for r in rows.values():
        r["write_over_plain_forward"] = r["write_s"] / plain
    print(f"PLAIN teacher forward over the same {tokens:,} tokens: {before:.1f} s before, {after:.1f} s after the "
          f"writes ({tokens / plain:.0f} tokens/s)", flush=True)
    return {"windows": len(windows), "tokens_in": tokens, "plain_forward_s": [before, after], "per_k": rows}


# ---- 2. step (child) -----------------------------------------------------------------------------------------------
def step_child(args) -> dict:
    from datasets import Dataset

    from hf_minitron.distill import DistillConfig, MinitronDistillTrainer
    from hf_minitron.models import load_model
    from hf_minitron.cached_distill import CachedDistillTrainer, TeacherCache, collate_cached

    torch.manual_seed(0)
    base = _rss_mb()
    student = load_model(os.path.join(args.out_dir, "pruned"), dtype="float32").train()
    cache = TeacherCache(_cache_dir(args, args.step_k))
    ds = cache.dataset()
    cfg = DistillConfig(output_dir="/tmp/bench_teacher_cache_step", report_to=[], gradient_checkpointing=False,
                        max_length=args.seq_len, kd_chunk_tokens=1024, bf16=False, is_layers="off")
    dummy = Dataset.from_dict({"input_ids": [[0] * args.seq_len]})
    if args.role == "live":
        teacher, tok, _ = _load_teacher()
        trainer = MinitronDistillTrainer(student, teacher, cfg, train_dataset=dummy, processing_class=tok)
    else:
        from hf_minitron.models import load_tokenizer, resolve_source

        tok = load_tokenizer(resolve_source(TEACHER))
        trainer = CachedDistillTrainer(student, cache, cfg, train_dataset=dummy, processing_class=tok)
    n_items = torch.tensor(args.batch * (args.seq_len - 1))

    def one(i: int) -> float:
        rows = [ds[(i * args.batch + j) % len(ds)] for j in range(args.batch)]  # the cache read is part of the step
        batch = collate_cached(rows)
        if args.role == "live":
            batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        student.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(student, batch, num_items_in_batch=n_items)
        loss.backward()
        return loss.item()

    one(0)
    t0 = time.perf_counter()
    losses = [one(i + 1) for i in range(args.steps)]
    dt = (time.perf_counter() - t0) / args.steps
    return {"role": args.role, "tokens_per_s": args.batch * args.seq_len / dt, "step_s": dt, "peak_rss_mb": _rss_mb(),
            "rss_at_start_mb": base, "teacher_loaded": args.role == "live", "loss": losses[-1]}


def bench_steps(args) -> list[dict]:
    out = []
    for rep in range(args.reps):
        for role in ("live", "cache"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--role", role]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(1)
            res = {**json.loads(line[-1][7:]), "rep": rep, "load_avg": os.getloadavg()[0]}
            print(f"STEP {role}: {res['tokens_per_s']:.0f} tokens/s, peak RSS {res['peak_rss_mb']:.0f} MB "
                  f"(load avg {res['load_avg']:.1f})", flush=True)
            out.append(res)
    return out


# ---- 3. quality ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each held-out window: the arms are compared window by window (paired)."""
    model.eval()
    out = []
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    return torch.tensor(out, dtype=torch.float64)


def paired_vs_full(nll: torch.Tensor, full: torch.Tensor) -> dict:
    """Mean per-window log-perplexity difference to full KD, its standard error, and a verdict at 2 SE."""
    d = nll - full
    se = (d.std(unbiased=True) / len(d) ** 0.5).item()
    mean = d.mean().item()
    verdict = "worse" if mean > 2 * se else "better" if mean < -2 * se else "inconclusive (within 2 SE)"
    return {"dlogppl": mean, "se": se, "verdict": verdict}


def bench_quality(args, teacher, tok) -> dict:
    from datasets import Dataset

    from hf_minitron.data import token_windows
    from hf_minitron.distill import distill
    from hf_minitron.models import load_model
    from hf_minitron.cached_distill import TeacherCache

    test = token_windows(f"{args.data_dir}/wikitext2_test.txt", tok, 512, windows=args.test_windows)
    pruned = load_model(os.path.join(args.out_dir, "pruned"), dtype="float32")
    common = dict(tokenizer=tok, overwrite=True, max_length=args.seq_len, per_device_train_batch_size=args.batch,
                  learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0,
                  save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True, seed=42, is_layers="off")
    first = TeacherCache(_cache_dir(args, args.ks[0]))
    windows, windows_sha = first.dataset()["input_ids"], first.meta["windows_sha256"]
    live_data = Dataset.from_dict({"input_ids": [list(map(int, w)) for w in windows]})
    out = {"pruned": {"ppl": float(torch.exp(window_nll(pruned, test).mean()))}}
    print(f"PPL pruned, no retraining: {out['pruned']['ppl']:.3f}", flush=True)
    arms = [("full", None, None)] + _caches(args)
    for name, k, top_p in arms:
        old = args.previous.get("quality", {}).get(name, {})
        if args.reuse and old.get("windows_sha256") == windows_sha:  # trained on these very windows
            out[name] = old
            print(f"PPL {name}: {out[name]['ppl']:.3f}, read back from the previous results", flush=True)
            continue
        t0 = time.perf_counter()
        student = copy.deepcopy(pruned)
        if k is None:
            res = distill(teacher, student, live_data, os.path.join(args.out_dir, f"kd_{name}"), args.kd_tokens,
                          text_column="input_ids", **common)
        else:
            res = distill(None, student, None, os.path.join(args.out_dir, f"kd_{name}"), args.kd_tokens,
                          teacher_cache=_cache_dir(args, k, top_p), **common)
        wall = time.perf_counter() - t0
        nll = window_nll(student, test)
        ppl = float(torch.exp(nll.mean()))
        out[name] = {"ppl": ppl, "tokens": res["tokens"], "steps": res["steps"], "train_loss": res["train_loss"],
                     "wall_s": wall, "window_nll": nll.tolist(), "windows_sha256": windows_sha}
        if k is not None:
            out[name]["vs_full"] = paired_vs_full(nll, torch.tensor(out["full"]["window_nll"], dtype=torch.float64))
        cmp = out[name].get("vs_full")
        cmp = f"; vs full KD {cmp['dlogppl']:+.4f} +- {cmp['se']:.4f} log-ppl: {cmp['verdict']}" if cmp else ""
        print(f"PPL {name}: {ppl:.3f} after {res['tokens']:,} tokens ({res['steps']} steps, {wall:.0f} s wall){cmp}",
              flush=True)
    return out


SAME = ("cache_tokens", "seq_len", "batch", "kd_tokens", "test_windows", "lr", "data_dir")  # what --reuse must match


def _previous(args) -> dict:
    """The earlier results.json of --out-dir when its run had the same windows, student and budgets, else {}."""
    path = os.path.join(args.out_dir, "results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if any(old["args"].get(k) != getattr(args, k) for k in SAME):
        print("--reuse: the previous run had other settings; nothing read back", flush=True)
        return {}
    return old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-tokens", type=int, default=32768, help="tokens of text cached (default: 32768)")
    p.add_argument("--seq-len", type=int, default=256, help="window length (default: 256)")
    p.add_argument("--batch", type=int, default=4, help="windows per teacher batch and per KD step (default: 4)")
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128, 512],
                   help="top-K values (default: 8,32,128,512)")
    p.add_argument("--top-ps", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                   help="comma list of top-P values, each cached at the largest K of --ks (default: none)")
    p.add_argument("--step-k", type=int, default=128, help="K of the cache the step timing reads (default: 128)")
    p.add_argument("--steps", type=int, default=4, help="timed KD steps per child after one warm-up (default: 4)")
    p.add_argument("--reps", type=int, default=2, help="live/cache child pairs (default: 2)")
    p.add_argument("--kd-tokens", type=int, default=16384, help="KD budget per quality arm; 0: skip (default: 16384)")
    p.add_argument("--test-windows", type=int, default=32,
                   help="held-out 512-token windows of WikiText-2 test for the quality arms (default: 32)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the quality arms (default: 2e-4)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: write, step, quality")
    p.add_argument("--data-dir", default=DATA_DIR, help="folder of the shared data files")
    p.add_argument("--out-dir", default="/tmp/bench_teacher_cache", help="caches, student and runs go here")
    p.add_argument("--reuse", action="store_true",
                   help="read back the caches written and the quality arms run by an earlier run into --out-dir with "
                        "the same student and budgets (a quality arm only when it trained on the same windows); run "
                        "only the new ones")
    p.add_argument("--role", choices=["live", "cache"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        print("RESULT " + json.dumps(step_child(args)), flush=True)
        return 0
    print(machine_line(), flush=True)
    print("command: python bench/teacher_cache.py " + " ".join(sys.argv[1:]), flush=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    args.previous = _previous(args) if args.reuse else {}
    teacher, tok, src = _load_teacher()
    teacher.eval()
    if not os.path.isfile(os.path.join(args.out_dir, "pruned", "config.json")):
        build_student(teacher, tok, args.data_dir, os.path.join(args.out_dir, "pruned"))
    results = {"machine": machine_line(), "args": {k: v for k, v in vars(args).items() if k != "previous"}}
    skip = set(args.skip.split(","))
    if "write" not in skip:
        results["write"] = bench_write(args, teacher, tok, src)
    if "step" not in skip:
        results["step"] = bench_steps(args)
        live = [r for r in results["step"] if r["role"] == "live"]
        cache = [r for r in results["step"] if r["role"] == "cache"]
        ratios = [c["tokens_per_s"] / v["tokens_per_s"] for v, c in zip(live, cache)]
        rss = [c["peak_rss_mb"] / v["peak_rss_mb"] for v, c in zip(live, cache)]
        print(f"STEP cache/live tokens/s per pair: {', '.join(f'{r:.2f}x' for r in ratios)}; peak RSS cache/live: "
              f"{', '.join(f'{r:.2f}x' for r in rss)}", flush=True)
    if args.kd_tokens > 0 and "quality" not in skip:
        results["quality"] = bench_quality(args, teacher, tok)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"load average at end: {os.getloadavg()}; results in {args.out_dir}/results.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
