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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

RESULTS_FILE = "eval_results.json"
PAPER_TASKS = {"mmlu": 5, "hellaswag": 10, "winogrande": 5, "arc_challenge": 25, "truthfulqa_mc2": 0, "gsm8k": 5}
CODE_TASKS = {"humaneval": 0, "mbpp": 3}
PRESETS = {"paper": PAPER_TASKS, "code": CODE_TASKS}
UNSAFE_TASKS = {"humaneval", "mbpp"}  # run generated code: lm-eval asks for an explicit confirmation
# metric shown in tables and plots, first one present wins
PRIMARY_METRICS = ["acc_norm", "acc", "mc2", "exact_match,strict-match", "exact_match", "pass@1", "pass_at_1"]


class EvalError(ValueError):
    pass


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows [n, seq_len], every window scored independently.

    Hand-written rather than `evaluate.load("perplexity")`: that metric reloads a model by name, while we score
    the in-memory pruned model.
    """
    device = next(model.parameters()).device
    model.eval()
    nll, tokens = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        batch = windows[i: i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        tokens += batch[:, 1:].numel()
    return math.exp(nll / tokens)


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


def token_stream(source, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [N] of a text source (path, Hub id or `TextSource`), documents joined by EOS, in order."""
    from .data import TextSource, load_text_dataset

    src = TextSource(source) if isinstance(source, str) else source
    ids: list[int] = []
    for row in load_text_dataset(src):
        text = row[src.text_column]
        if not text:
            continue
        if ids and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def evaluate_perplexity(model, tokenizer, source, seq_len: int = 512, windows: int | None = 16,
                        stride: int | None = None, progress: bool = True) -> dict:
    """Perplexity of `model` on the first `windows` windows of `source`, as a result record."""
    from .data import DataSourceError, TextSource

    src = TextSource(source) if isinstance(source, str) else source
    stride = stride or seq_len
    need = None if windows is None else (windows - 1) * stride + seq_len
    ids = token_stream(src, tokenizer, need)
    if len(ids) < seq_len:
        raise DataSourceError(f"{src.path!r} has {len(ids)} tokens, fewer than one window of {seq_len}")
    if stride == seq_len:
        n = len(ids) // seq_len
        value = perplexity(model, ids[: n * seq_len].view(n, seq_len), progress=progress)
    else:
        value = sliding_perplexity(model, ids, seq_len, stride, progress=progress)
    return {"data": src.path, "config": src.config, "split": src.split, "seq_len": seq_len, "stride": stride,
            "tokens": len(ids), "perplexity": value}


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


def evaluate_model(model, tokenizer, *, name: str, tasks=None, local_tasks: list[LocalChoiceTask] = (),
                   ppl_data=None, ppl_seq_len: int = 512, ppl_windows: int | None = 16, ppl_stride: int | None = None,
                   limit: int | None = None, batch_size: int = 8, allow_code_execution: bool = False) -> dict:
    """One member's results record: parameters, perplexity on each text source, task metrics."""
    from .archs import count_parameters

    try:
        params = count_parameters(model.config)
    except Exception:  # an architecture we do not know: count the tensors instead
        params = sum(p.numel() for p in model.parameters())
    result = {"model": name, "parameters": params, "perplexity": [], "tasks": {}}
    sources = [ppl_data] if isinstance(ppl_data, str) or hasattr(ppl_data, "path") else list(ppl_data or [])
    for source in sources:
        result["perplexity"].append(evaluate_perplexity(model, tokenizer, source, ppl_seq_len, ppl_windows,
                                                        ppl_stride))
    task_dict = parse_tasks(tasks)
    if task_dict or local_tasks:
        result["tasks"] = run_lm_eval(model, tokenizer, task_dict, list(local_tasks), limit=limit,
                                      batch_size=batch_size, allow_code_execution=allow_code_execution)
    return result


def evaluate_member(folder: str, out: str | None = None, name: str | None = None, dtype: str | None = None,
                    device: str = "cpu", revision: str | None = None, gguf_file: str | None = None,
                    trust_remote_code: bool = False, **kwargs) -> dict:
    """Load a model (folder, Hub id or .gguf), evaluate it and write the record to `out` (default: folder/RESULTS_FILE).

    Keyword arguments go to `evaluate_model` (tasks, local_tasks, ppl_data, ppl_seq_len, ppl_windows, limit, ...).
    """
    from .models import load_model, load_tokenizer, resolve_source

    source = resolve_source(folder, revision=revision, gguf_file=gguf_file)
    model = load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    result = evaluate_model(model, load_tokenizer(source, trust_remote_code), name=name or Path(folder).name, **kwargs)
    if out is None and os.path.isdir(folder):
        out = os.path.join(folder, RESULTS_FILE)
    if out:
        save_results(result, out)
    return result


def save_results(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise EvalError(f"results file {str(path)!r} does not exist")
    return json.loads(path.read_text())


__all__ = ["perplexity", "sliding_perplexity", "token_stream", "evaluate_perplexity", "LocalChoiceTask",
           "write_task_yaml", "parse_tasks", "run_lm_eval", "primary_metric", "evaluate_model", "evaluate_member",
           "save_results", "load_results", "RESULTS_FILE", "PAPER_TASKS", "CODE_TASKS"]
