"""Evaluation of family members: perplexity on any text source, benchmark tasks through `lm-eval`.

- Perplexity: `perplexity(model, windows)` on non-overlapping windows, or `sliding_perplexity` with a stride
  (every scored token sees up to `seq_len - 1` tokens of context), on any `TextSource`.
- Benchmarks: `lm_eval.simple_evaluate` on the in-memory model (`HFLM(pretrained=model, tokenizer=...)`), one call per
  few-shot setting. `PAPER_TASKS` is the Minitron paper's set (needs dataset downloads).
- Offline multiple-choice tasks from a local JSONL file (HellaSwag layout: `ctx`, `endings`, `label`) also go
  through `lm-eval`, as a custom task: we write a task YAML (`dataset_path: json`, `dataset_kwargs.data_files`) and
  load it with `TaskManager(include_path=...)`. So local and Hub tasks are scored by the same code (sum log-likelihood
  of `" " + ending`; `acc_norm` divides by the ending's length in characters), and the numbers match `lm-eval`'s.

`evaluate` (the HF library) is not used for the scores: `evaluate.load("perplexity")` reloads a model by name
while we score the in-memory pruned model, and its accuracy metric would be fetched from the Hub, which fails
offline, for a mean that `lm-eval` already computes with its standard error.

Run alone: `hf-minitron eval --model M --tasks paper --out results.json`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .rundir import EVAL_FILE
from .utils import read_json

RESULTS_FILE = EVAL_FILE  # named in rundir.py, with every artefact of a run
PAPER_TASKS = {"mmlu": 5, "hellaswag": 10, "winogrande": 5, "arc_challenge": 25, "truthfulqa_mc2": 0, "gsm8k": 5}
CODE_TASKS = {"humaneval": 0, "mbpp": 3}
PRESETS = {"paper": PAPER_TASKS, "code": CODE_TASKS}
UNSAFE_TASKS = {"humaneval", "mbpp"}  # run generated code: lm-eval asks for an explicit confirmation
# metric shown in tables and plots, first one present wins
LOOP_PROMPTS = ("The history of the city", "def read_config(path):", "In this tutorial we will")
PRIMARY_METRICS = ["acc_norm", "acc", "mc2", "exact_match,strict-match", "exact_match", "pass@1", "pass_at_1"]


class EvalError(ValueError):
    pass


@dataclass
class EvaluateConfig:
    """What to score a model on: held-out perplexity and benchmark tasks. The recipe's `evaluate:` section and
    `hf-minitron eval`'s flags."""

    seq_len: int = field(default=512, metadata={"help": "tokens per perplexity window"})
    windows: int | None = field(default=16, metadata={"help": "perplexity windows to score; 0 or none: all the text"})
    stride: int | None = field(default=None, metadata={
        "help": "move windows by this many tokens, scoring only new ones, so each token has more context "
                "(none: seq_len, non-overlapping windows)"})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-eval tasks, each optionally name:shots; 'paper' = MMLU 5-shot, HellaSwag 10, Winogrande 5, "
                "ARC-Challenge 25, TruthfulQA MC2 0, GSM8K 5; 'code' = HumanEval, MBPP (need their data sets)"})
    choice_files: list[str] = field(default_factory=list, metadata={
        "help": "local multiple-choice JSONL files in HellaSwag layout (ctx, endings, label), scored 0-shot by "
                "log-likelihood through lm-eval (acc, acc_norm)"})
    context_column: str = field(default="ctx", metadata={"help": "context column of the choice files"})
    choices_column: str = field(default="endings", metadata={"help": "choices column of the choice files"})
    label_column: str = field(default="label", metadata={"help": "label column of the choice files"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N examples of each task"})
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    allow_code_execution: bool = field(default=False, metadata={
        "help": "let code tasks (humaneval, mbpp) execute the generated programs"})
    teacher: bool = field(default=True, metadata={
        "help": "also score the teacher, for the summary and the family table", "build_only": True})
    greedy_prompts: list[str] = field(default_factory=lambda: list(LOOP_PROMPTS), metadata={
        "help": "prompts whose greedy continuations (48 new tokens) are recorded and checked for a loop (a 4-gram "
                "repeated three times), which perplexity does not show; empty: none"})

    def local_tasks(self) -> list[LocalChoiceTask]:
        return [LocalChoiceTask(f, context_column=self.context_column, choices_column=self.choices_column,
                                label_column=self.label_column) for f in self.choice_files]

    def check(self, key: str = "evaluate") -> None:
        """Task names and shots parse (presets expand) before any model is loaded."""
        parse_tasks(self.tasks)
        if self.stride is not None and not 0 < self.stride <= self.seq_len:
            raise EvalError(f"{key}.stride: {self.stride} must be in 1..seq_len ({self.seq_len})")


def repeated_ngram(ids: list[int], n: int = 4, times: int = 3) -> tuple[int, ...] | None:
    """The first n-gram of `ids` that occurs `times` times or more (a degenerate greedy loop), else None."""
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= times:
            return gram
    return None


@torch.no_grad()
def greedy_loops(model, tokenizer, prompts=LOOP_PROMPTS, max_new_tokens: int = 48) -> list[dict]:
    """Each prompt's greedy continuation and the 4-gram it loops on (None: no loop), the check that a member does
    not degenerate into repetition the way perplexity cannot show."""
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)[0, enc.input_ids.shape[1]:]
        gram = repeated_ngram(ids.tolist())
        out.append({"prompt": prompt, "continuation": tokenizer.decode(ids, skip_special_tokens=True),
                    "loop": None if gram is None else tokenizer.decode(list(gram))})
    return out


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows [n, seq_len], every window scored independently.

    Hand-written rather than `evaluate.load("perplexity")`: that metric reloads a model by name, while we score
    the in-memory pruned model.
    """
    nll, tokens = nll_sum(model, windows, batch_size, progress)
    return math.exp(nll / tokens)


@torch.no_grad()
def nll_sum(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> tuple[float, int]:
    """(summed next-token NLL, tokens predicted) over windows [n, seq_len]: sums, so that processes scoring a share
    of the windows each can add theirs up (the search under `accelerate launch`)."""
    device = next(model.parameters()).device
    model.eval()
    nll, tokens = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        batch = windows[i: i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        tokens += batch[:, 1:].numel()
    return nll, tokens


@torch.no_grad()
def sliding_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int, progress: bool = False) -> float:
    """Perplexity of a token stream [N] with windows of `seq_len` moved by `stride` (the transformers guide's method).

    Each window scores only the tokens the previous one did not, so with `stride < seq_len` every token after the
    first window is predicted from at least `seq_len - stride` tokens of context; `stride == seq_len` is `perplexity`
    on consecutive windows.
    """
    if not 0 < stride <= seq_len:
        raise EvalError(f"stride {stride} must be in 1..seq_len ({seq_len})")
    device = next(model.parameters()).device
    model.eval()
    nll, tokens, prev_end = 0.0, 0, 0
    starts = range(0, max(len(ids) - 1, 1), stride)
    for begin in tqdm(starts, desc="perplexity", disable=not progress):
        end = min(begin + seq_len, len(ids))
        new = end - max(prev_end, begin + 1)  # tokens scored in this window (the first one has no context)
        if new <= 0:
            break
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=window).logits[0, -new - 1:-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[0, -new:], reduction="sum").item()
        tokens += new
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / tokens)


# ---- benchmark tasks through lm-eval ----


@dataclass
class LocalChoiceTask:
    """A multiple-choice task in a local JSONL file: a context, a list of choices and the index of the right one."""

    path: str
    name: str | None = None
    context_column: str = "ctx"
    choices_column: str = "endings"
    label_column: str = "label"

    @property
    def task_name(self) -> str:
        return self.name or "local_" + re.sub(r"\W+", "_", Path(self.path).stem).strip("_").lower()


def check_local_task(task: LocalChoiceTask) -> None:
    """Fail early, in one line, on a missing file or column (lm-eval's own errors are long and late)."""
    if not os.path.isfile(task.path):
        raise EvalError(f"task file {task.path!r} does not exist")
    with open(task.path, encoding="utf-8") as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise EvalError(f"task file {task.path!r} is not JSON lines (first line does not parse)") from None
    for column in (task.context_column, task.choices_column, task.label_column):
        if column not in row:
            raise EvalError(f"task file {task.path!r} has no column {column!r}; columns: {', '.join(row)}")
    if not isinstance(row[task.choices_column], list):
        raise EvalError(f"column {task.choices_column!r} of {task.path!r} must hold a list of choices")


def write_task_yaml(task: LocalChoiceTask, folder: str | Path) -> Path:
    """An lm-eval task config for a local JSONL multiple-choice file (loaded by `datasets`' json builder)."""
    import yaml

    config = {
        "task": task.task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": os.path.abspath(task.path)}},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "{{" + task.context_column + "}}",
        "doc_to_choice": task.choices_column,
        "doc_to_target": "{{" + task.label_column + "}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    path = Path(folder) / f"{task.task_name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def parse_tasks(spec) -> dict[str, int | None]:
    """'paper', 'code', 'mmlu:5,hellaswag' or a list/dict of those -> {task: num_fewshot (None = task default)}."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks: dict[str, int | None] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item in PRESETS:
            tasks.update(PRESETS[item])
            continue
        name, _, shots = item.partition(":")
        try:
            tasks[name] = int(shots) if shots else PAPER_TASKS.get(name, CODE_TASKS.get(name))
        except ValueError:
            raise EvalError(f"bad few-shot count in task {item!r}; write name:shots, e.g. mmlu:5") from None
    return tasks


def _metrics(raw: dict) -> dict:
    """lm-eval's 'acc,none' keys -> 'acc'; other filters keep their name ('exact_match,strict-match')."""
    out = {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else key] = value
    return out


def run_lm_eval(model, tokenizer, tasks: dict[str, int | None] | None = None,
                local_tasks: list[LocalChoiceTask] = (), limit: int | None = None, batch_size: int = 8,
                allow_code_execution: bool = False, bootstrap_iters: int = 1000) -> dict:
    """Score an in-memory model on lm-eval tasks ({name: shots}) and local JSONL tasks (0-shot) -> {task: metrics}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = dict(tasks or {})
    for task in local_tasks:
        check_local_task(task)
    if UNSAFE_TASKS & set(tasks) and not allow_code_execution:
        raise EvalError(f"tasks {sorted(UNSAFE_TASKS & set(tasks))} execute generated code; allow it explicitly")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hf-minitron-tasks-") as folder:
        for task in local_tasks:
            write_task_yaml(task, folder)
        manager = TaskManager(include_path=folder if local_tasks else None, include_defaults=bool(tasks))
        unknown = [name for name in tasks if name not in manager.all_tasks]
        if unknown:
            raise EvalError(f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}; list them with "
                            f"`lm-eval ls tasks`")
        groups: dict[int | None, list[str]] = {}
        for name, shots in tasks.items():
            groups.setdefault(shots, []).append(name)
        if local_tasks:
            groups.setdefault(0, []).extend(t.task_name for t in local_tasks)
        for shots, names in groups.items():
            try:
                out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit,
                                              task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters,
                                              confirm_run_unsafe_code=allow_code_execution, verbosity="ERROR")
            except Exception as e:  # dataset downloads fail offline deep inside datasets
                first = str(e).splitlines()[0] if str(e) else repr(e)
                raise EvalError(f"lm-eval could not run {', '.join(names)}: {first}") from e
            found = {**out.get("groups", {}), **out["results"]}
            for name in names:
                metrics = _metrics(found.get(name, {}))
                results[name] = {"metrics": metrics, "num_fewshot": shots, "limit": limit,
                                 "samples": out.get("n-samples", {}).get(name, {}).get("effective"),
                                 "scorer": f"lm-eval {lm_eval.__version__}"}
    return results


def primary_metric(task_result: dict) -> tuple[str, float] | None:
    """The metric a table or plot shows for a task: acc_norm, then acc, mc2, exact match, pass@1."""
    metrics = task_result.get("metrics", {})
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name, metrics[name]
    return next(((k, v) for k, v in metrics.items() if "stderr" not in k), None)


# ---- per-member results ----


def perplexity_record(model, tokenizer, source, config: EvaluateConfig, holdout: float = 0.0,
                      progress: bool = False, cache: dict | None = None) -> dict:
    """Perplexity of `model` on `source` (its held-out tail when `holdout` > 0), as a result record; the windows
    are cut by `data.token_windows`, the same for the build, `hf-minitron eval` and the search."""
    from .data import TextSource, token_windows

    src = TextSource(source) if isinstance(source, str) else source
    stride = config.stride or config.seq_len
    ids = token_windows(src, tokenizer, config.seq_len, config.windows or None, stride, holdout, cache)
    if stride == config.seq_len:
        value = perplexity(model, ids, progress=progress)
    else:
        value = sliding_perplexity(model, ids, config.seq_len, stride, progress=progress)
    return {"data": src.path, "config": src.config, "split": src.split, "seq_len": config.seq_len, "stride": stride,
            "tokens": ids.numel(), "heldout_share": holdout or None, "perplexity": value}


def evaluate_model(model, tokenizer, name: str, config: EvaluateConfig | None = None, ppl_data=(),
                   holdout: float = 0.0, out: str | Path | None = None, progress: bool = False,
                   cache: dict | None = None) -> dict:
    """One model's results record: parameters, perplexity on each text source, task metrics; written to `out`.

    The entry point of `hf-minitron eval` and of the build's evaluate stage. `holdout`: score the held-out tail
    of the sources (the build's, when evaluation reads the distillation text).
    """
    from .archs import count_parameters

    config = config or EvaluateConfig()
    config.check()
    try:
        params = count_parameters(model.config)
    except ValueError:  # an architecture we do not know: count the tensors instead
        params = sum(p.numel() for p in model.parameters())
    result = {"model": name, "parameters": params, "perplexity": [], "tasks": {}}
    sources = [ppl_data] if isinstance(ppl_data, str) or hasattr(ppl_data, "path") else list(ppl_data or [])
    if sources:
        from .models import check_positions

        check_positions(model.config, config.seq_len, "perplexity seq_len")
    for source in sources:
        result["perplexity"].append(perplexity_record(model, tokenizer, source, config, holdout, progress, cache))
    task_dict = parse_tasks(config.tasks)
    if task_dict or config.choice_files:
        result["tasks"] = run_lm_eval(model, tokenizer, task_dict, config.local_tasks(), limit=config.limit,
                                      batch_size=config.batch_size, allow_code_execution=config.allow_code_execution)
    if config.greedy_prompts:
        result["greedy"] = greedy_loops(model, tokenizer, config.greedy_prompts)
    if out is not None:
        save_results(result, out)
    return result


def results_path(out: str | None, model: str) -> str:
    """Where `hf-minitron eval` writes: `out`, else eval_results.json in the model's folder, checked writable now."""
    from .utils import check_writable

    if out is not None:
        return out
    if not os.path.isdir(model):
        raise EvalError(f"--out is needed when --model ({model!r}) is not a local folder")
    return str(check_writable(os.path.join(model, RESULTS_FILE), folder=False))


def save_results(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise EvalError(f"results file {str(path)!r} does not exist")
    return read_json(path)


__all__ = ["perplexity", "sliding_perplexity", "perplexity_record", "EvaluateConfig", "LocalChoiceTask",
           "write_task_yaml", "parse_tasks", "run_lm_eval", "primary_metric", "evaluate_model", "save_results",
           "load_results", "RESULTS_FILE", "PAPER_TASKS", "CODE_TASKS"]
