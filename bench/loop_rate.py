"""How often a model's greedy text loops, on many prompts no arm trains on: the quickstart's check (3 fixed prompts,
48 greedy tokens, a 4-gram seen 3 times) counts 0-3 loops, too few to tell two arms apart. This scores the same
check on N paragraph openings of WikiText-2 test and N of the held-out tail of pydoc-topics (the quickstart's 15%),
each model on the same prompts, and prints one JSON line: per model and text the loop rate with its standard error,
the 3 fixed prompts' loops, and, for each model after the first, its paired difference to the first (per prompt,
so the SE is the paired one).

    python bench/loop_rate.py --model /tmp/s11/qsF/run/smollm2-70m --model /tmp/arm/ul25 [--n 64]
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

from hf_minitron.data import TextSource, load_text_dataset, split_holdout
from hf_minitron.evaluate import LOOP_PROMPTS, greedy_loops, repeated_ngram
from hf_minitron.models import load_model_spec

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext2_test.txt")
PROMPT_WORDS = 12  # each prompt: a paragraph's first 12 words


def wikitext_openings(path: str, n: int) -> list[str]:
    """The first PROMPT_WORDS words of the first `n` body paragraphs (no headings, no <unk> in the prompt),
    with WikiText's tokenisation undone (" @-@ " -> "-", " , " -> ", ")."""
    out = []
    for para in open(path, encoding="utf-8").read().split("\n"):
        para = para.strip()
        if not para or para.startswith("=") or len(para.split()) < 40:
            continue
        text = re.sub(r" @(.)@ ", r"\1", para)
        text = re.sub(r" ([,.;:!?)'])", r"\1", text).replace("( ", "(")
        words = text.split()[:PROMPT_WORDS]
        if "<unk>" not in " ".join(words):
            out.append(" ".join(words))
        if len(out) == n:
            break
    return out


def pydoc_openings(n: int, holdout: float = 0.15) -> list[str]:
    """The first PROMPT_WORDS words of the first `n` prose paragraphs (>= 30 words) of pydoc-topics' held-out
    documents, the quickstart's evaluation tail."""
    held = split_holdout(load_text_dataset(TextSource("pydoc-topics")), holdout)[1]
    out = []
    for doc in held["text"]:
        for para in re.split(r"\n\s*\n", doc):
            words = para.split()
            if len(words) >= 30 and not para.startswith(" "):
                out.append(" ".join(words[:PROMPT_WORDS]))
                if len(out) == n:
                    return out
    return out


@torch.no_grad()
def loops(model, tok, prompts: list[str], new_tokens: int = 48) -> list[int]:
    """1 per prompt whose greedy continuation (greedy_loops' settings, one prompt at a time) repeats a 4-gram 3
    times, else 0."""
    hits = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        hits.append(int(repeated_ngram(ids[0, enc.input_ids.shape[1]:].tolist()) is not None))
    return hits


def rate(hits: list[int]) -> dict:
    n = len(hits)
    p = sum(hits) / n
    return {"rate": p, "se": (p * (1 - p) / n) ** 0.5, "n": n}


def paired_rate(a: list[int], b: list[int]) -> dict:
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return {"diff": d.mean().item(), "se": (d.std(unbiased=True) / len(d) ** 0.5).item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="model spec (repeat; the first is the reference)")
    p.add_argument("--n", type=int, default=64, help="prompts per text (default: 64)")
    a = p.parse_args()
    texts = {"pydoc-topics": pydoc_openings(a.n)}
    if os.path.isfile(WIKITEXT):
        texts["wikitext2_test"] = wikitext_openings(WIKITEXT, a.n)
    torch.manual_seed(0)
    results, start = {}, time.time()
    for spec in a.model:
        model, tok = load_model_spec(spec, None, "cpu")
        model.eval()
        hits = {name: loops(model, tok, prompts) for name, prompts in texts.items()}
        fixed = greedy_loops(model, tok, LOOP_PROMPTS)
        results[spec] = {"hits": hits, "rates": {k: rate(v) for k, v in hits.items()},
                         "fixed_prompt_loops": sum(1 for g in fixed if g["loop"])}
        print(spec, json.dumps(results[spec]["rates"]), results[spec]["fixed_prompt_loops"], file=sys.stderr)
    ref = a.model[0]
    for spec in a.model[1:]:
        results[spec]["vs_first"] = {k: paired_rate(results[spec]["hits"][k], results[ref]["hits"][k])
                                     for k in texts}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"command": " ".join(sys.argv), "commit": commit, "prompts": texts, "results": results,
                      "wall_s": round(time.time() - start),
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch_threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
