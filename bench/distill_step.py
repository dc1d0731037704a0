"""Speed and peak memory of one distillation step: hf-minitron's chunked KD vs TRL's experimental GKDTrainer.

GKD runs off-policy forward KL here (lmbda=0, beta=0): its own `compute_loss` is called on the same pair, batch and
sequence length, so both sides do one student forward+backward and one teacher forward; only the loss differs
(full [batch, seq, vocab] logits of both models vs hidden states + chunked LM head). Each method runs in its own
process so peak memory (CUDA: max allocated; CPU: max RSS growth) is not shared.

    python bench/distill_step.py --teacher SmolLM2.gguf-folder-or-file --student pruned-folder --batch 4 --seq 512

`--against bf16` times hf-minitron's step in fp32 against the same step under bf16 autocast (the student's forward,
the teacher's and the loss, as a bf16 build trains; weights fp32), e.g. on a CPU with AVX512-BF16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    from datasets import Dataset

    from hf_minitron.distill import DistillConfig, MinitronDistillTrainer
    from hf_minitron.models import load_model, load_tokenizer, resolve_source

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(resolve_source(args.teacher))
    teacher = load_model(args.teacher, device=device, dtype=args.dtype)
    student = load_model(args.student or args.teacher, device=device, dtype=args.dtype).train()
    ids = torch.randint(0, len(tok), (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    n_items = torch.tensor(args.batch * (args.seq - 1), device=device)
    if args.method in ("ours", "ours_bf16"):
        bf16 = args.method == "ours_bf16"
        cfg = DistillConfig(output_dir="/tmp/bench_distill_step", report_to=[], gradient_checkpointing=False,
                            max_length=args.seq, kd_chunk_tokens=args.chunk, bf16=bf16)
        trainer = MinitronDistillTrainer(student, teacher, cfg, train_dataset=Dataset.from_dict({"text": ["x"]}),
                                         processing_class=tok)

        def step():  # the student's forward autocast as accelerate's prepared model is; the rest by compute_loss
            with torch.autocast(device, torch.bfloat16, enabled=bf16):
                return trainer.compute_loss(student, dict(inputs), num_items_in_batch=n_items)
    else:
        from trl.experimental.gkd import GKDTrainer

        gkd = SimpleNamespace(teacher_model=teacher, beta=0.0, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)

        def step():
            return GKDTrainer.compute_loss(gkd, student, dict(inputs), num_items_in_batch=n_items)

    def one():
        student.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        return loss.item()

    one()  # warm-up (allocator, kernels, lazy hooks)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    losses = [one() for _ in range(args.steps)]
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb()
    return {"method": args.method, "device": device, "tokens_per_s": args.batch * args.seq / dt, "step_s": dt,
            "peak_mb": peak, "rss_before_mb": base_rss, "loss": losses[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher: Hub id, folder or .gguf file")
    p.add_argument("--student", default=None, help="student (default: a second copy of the teacher)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default: 3)")
    p.add_argument("--chunk", type=int, default=1024, help="hf-minitron KD chunk in tokens (default: 1024)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the models' own)")
    p.add_argument("--against", choices=["gkd", "bf16"], default="gkd",
                   help="gkd: TRL's GKDTrainer loss; bf16: hf-minitron's own step under bf16 autocast")
    p.add_argument("--method", choices=["ours", "gkd", "ours_bf16"], default=None,
                   help="run one side only (internal)")
    args = p.parse_args(argv)
    if args.method:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    results, other = {}, {"gkd": "gkd", "bf16": "ours_bf16"}[args.against]
    for method in ("ours", other):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--method", method]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[method] = json.loads(line[-1][7:])
        print(json.dumps(results[method]))
    ours, gkd = results["ours"], results[other]
    print(json.dumps({"versus": other, "tokens_per_s_ratio": ours["tokens_per_s"] / gkd["tokens_per_s"],
                      "peak_memory_ratio": ours["peak_mb"] / gkd["peak_mb"],
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
                      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                      "note": "CPU peak = max RSS of the process (includes weights); CUDA peak = max allocated"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
