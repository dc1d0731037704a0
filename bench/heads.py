"""Which attention heads to keep: each head score, with and without the section-2.3 merge, against random choices.

Protocol (issue 10): the real SmolLM2-135M teacher, heads 9 -> 6 (one query head dropped per KV group, every
layer), prune only (no retraining), WikiText-2 test perplexity on the first `--eval-windows` x `--eval-len`
tokens. Every arm is pruned from the same importance pass (same calibration windows, same seed) and scored on the
same evaluation windows; random arms draw one head per group with seeds 0..`--random`-1.

    python bench/heads.py                                   # 32 x 512 calibration, ablation on 4 x 256
    python bench/heads.py --ablation-samples 0              # input/output scores only (fast)
    python bench/heads.py --heads 3 --kv-heads 3            # a harder prune
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from importance import DATA_DIR, default_teacher  # noqa: E402  (bench/importance.py)

from hf_minitron.data import TextSource, pack_tokens, token_windows  # noqa: E402
from hf_minitron.evaluate import perplexity  # noqa: E402
from hf_minitron.heads import ablation_scores, head_ablation  # noqa: E402
from hf_minitron.importance import ImportanceConfig, compute_importance  # noqa: E402
from hf_minitron.models import load_model, load_tokenizer, resolve_source  # noqa: E402
from hf_minitron.prune import PruneConfig, PruneTarget, prune_model  # noqa: E402


def machine() -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit, "command": " ".join(sys.argv)}


def random_scores(scores, seed: int) -> torch.Tensor:
    """Scores that make prune keep random heads (uniform, independent per layer)."""
    shape = scores.tensors["heads"].shape[2:]
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=default_teacher())
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ablation-samples", type=int, default=4)
    p.add_argument("--ablation-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--random", type=int, default=5)
    p.add_argument("--out", default="bench/heads.json")
    args = p.parse_args()
    torch.manual_seed(0)
    source = resolve_source(args.teacher)
    tok = load_tokenizer(source)
    model = load_model(source, dtype="float32")
    calib = TextSource(str(DATA_DIR / "wikitext2_valid.txt"))
    test = TextSource(str(DATA_DIR / "wikitext2_test.txt"))
    windows = token_windows(test, tok, args.eval_len, args.eval_windows)
    results = {"machine": machine(), "protocol": vars(args), "arms": {}}

    def record(name: str, value: float) -> None:
        results["arms"][name] = value
        print(f"{name:28s} {value:10.2f}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    record("teacher", perplexity(model, windows))
    t0 = time.time()
    packed = pack_tokens(calib, tok, args.samples, args.seq_len, seed=0)
    scores = compute_importance(model, packed.input_ids, ImportanceConfig(depth_ppl_samples=0), progress=False)
    results["calibration_s"] = round(time.time() - t0, 1)
    if args.ablation_samples:
        t0 = time.time()
        short = pack_tokens(calib, tok, args.ablation_samples, args.ablation_len, seed=1).input_ids
        scores.tensors.update(head_ablation(model, [short], progress=True))
        results["ablation_s"] = round(time.time() - t0, 1)
        results["ablation_scores"] = ablation_scores(scores.tensors).tolist()
    target = PruneTarget(num_heads=args.heads, num_kv_heads=args.kv_heads)
    for score in ("input", "output", "ablation"):
        if score == "ablation" and not args.ablation_samples:
            continue
        for merge in (False, True):
            student, _ = prune_model(model, scores, target, PruneConfig(head_score=score, merge_heads=merge))
            record(f"{score}{' + merge' if merge else ''}", perplexity(student, windows))
    saved = scores.tensors["heads"].clone()
    rand = []
    for seed in range(args.random):
        # input score stats [2, 3, layers, heads]: overwrite every aggregation with the same random ranking
        scores.tensors["heads"] = random_scores(scores, seed).expand_as(saved).double().contiguous()
        student, _ = prune_model(model, scores, target, PruneConfig(head_score="input"))
        rand.append(perplexity(student, windows))
        record(f"random seed {seed}", rand[-1])
    scores.tensors["heads"] = saved
    results["random_median"] = statistics.median(rand)
    print(f"{'random median':28s} {results['random_median']:10.2f}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
