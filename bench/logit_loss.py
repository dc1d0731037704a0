"""The logit loss of one distillation step with its tokens in one chunk: run directly (what `chunked_logit_losses`
does now) vs under activation checkpointing (what it did before: both LM heads recomputed in the backward).

Random final hidden states of SmolLM2's width (576) and vocabulary (49,152) by default, forward + backward of the
forward KL, timed `--reps` times after a warm-up; each arm in its own process so peak RSS is its own.

    python bench/logit_loss.py                  # 1,024 tokens (the quickstart's 4 x 256 step)
    python bench/logit_loss.py --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial

import torch


def run_arm(args) -> dict:
    from torch.utils.checkpoint import checkpoint

    from hf_minitron.losses import _chunk_losses, chunked_logit_losses

    torch.manual_seed(0)
    h_s = torch.randn(args.tokens, args.hidden, requires_grad=True)
    h_t, labels = torch.randn(args.tokens, args.hidden), torch.randint(0, args.vocab, (args.tokens,))
    s_head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    t_head = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    if args.arm == "direct":
        def loss():
            return chunked_logit_losses(h_s, h_t, labels, s_head, t_head, chunk_tokens=args.tokens, with_ce=False)[0]
    else:
        fn = partial(_chunk_losses, student_head=s_head, teacher_head=t_head, vocab=args.vocab, kind="forward_kl",
                     temperature=1.0, top_k=None, beta=0.5, with_ce=False, student_transform=None,
                     teacher_transform=None)

        def loss():
            return checkpoint(fn, h_s, h_t, labels, use_reentrant=False)[0]
    times = []
    for _ in range(args.reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        loss().backward()
        times.append(time.perf_counter() - t0)
    return {"arm": args.arm, "s_per_call": sorted(times[1:])[len(times[1:]) // 2],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="scored tokens in the step (default: 1024)")
    p.add_argument("--hidden", type=int, default=576, help="hidden size (default: 576, SmolLM2-135M)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary (default: 49152, SmolLM2)")
    p.add_argument("--reps", type=int, default=4, help="timed calls after one warm-up (default: 4); median")
    p.add_argument("--arm", choices=["direct", "checkpointed"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return 0
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); command: "
          f"python bench/logit_loss.py {' '.join(sys.argv[1:])}", flush=True)
    results = {}
    for arm in ("checkpointed", "direct"):
        out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--arm", arm], capture_output=True,
                             text=True, check=True).stdout
        results[arm] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        print(json.dumps(results[arm]), flush=True)
    print(f"direct / checkpointed time: {results['direct']['s_per_call'] / results['checkpointed']['s_per_call']:.2f}x",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
