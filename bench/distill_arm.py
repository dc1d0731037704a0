"""One distillation arm on the quickstart's data: a pruned student distilled from a teacher for a token budget, then
scored on the held-out tail of `pydoc-topics` (the quickstart's 8 x 512 windows). bench/RESULTS.md's short-run
arms (learning rate, shape, L_is pairing) ran this way, with the students cut by `hf-minitron prune`:

    hf-minitron prune --teacher RUN/smollm2-100m --importance RUN/importance/smollm2-100m \\
        --hidden-size 576 --ffn-size 640 --num-heads 9 --num-layers 21 --depth-metric bi --out /tmp/p-640-21
    python bench/distill_arm.py --student /tmp/p-640-21 --teacher RUN/smollm2-100m --out /tmp/kd-640-21 \\
        --set learning_rate=6e-4 min_lr=3e-5 [is_layers=off]

Prints one JSON line: the settings, wall seconds, held-out perplexity, how many greedy prompts loop, the loss curve.
"""

import argparse
import json
import os
import platform
import time

import torch

from hf_minitron.data import TextSource, load_text_dataset, split_holdout
from hf_minitron.distill import DistillConfig, distill
from hf_minitron.evaluate import EvaluateConfig, evaluate_model
from hf_minitron.models import load_model_spec

BASE = dict(max_length=256, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-4,
            lr_scheduler_type="cosine_with_min_lr", min_lr=1e-5, warmup_steps=0.1)  # the quickstart's, before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="pruned student folder")
    p.add_argument("--teacher", required=True, help="KD teacher (model spec)")
    p.add_argument("--out", required=True, help="output folder (overwritten)")
    p.add_argument("--tokens", type=int, default=24000, help="distillation tokens (the quickstart's 24K)")
    p.add_argument("--holdout", type=float, default=0.15, help="held-out share of the documents (the quickstart's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DistillConfig overrides (JSON values)")
    a = p.parse_args()
    overrides = {}
    for item in a.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    data = split_holdout(load_text_dataset(TextSource("pydoc-topics")), a.holdout)[0]
    start = time.time()
    config = DistillConfig(output_dir=a.out, tokens=a.tokens, disable_tqdm=True, **{**BASE, **overrides})
    res = distill(a.teacher, a.student, data, a.out, config=config, overwrite=True)
    wall = time.time() - start
    model, tok = load_model_spec(a.out, None, "cpu")
    r = evaluate_model(model, tok, "arm", EvaluateConfig(seq_len=512, windows=8), [TextSource("pydoc-topics")],
                       a.holdout)
    print(json.dumps({"student": a.student, "teacher": a.teacher, "set": overrides, "wall_s": round(wall),
                      "perplexity": r["perplexity"][0]["perplexity"],
                      "greedy_loops": sum(1 for g in r.get("greedy", []) if g.get("loop")),
                      "loss": [h["loss"] for h in res["log_history"] if "loss" in h],
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch_threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
