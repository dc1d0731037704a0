"""Architecture search for a parameter budget: enumerate shapes, prune each, retrain briefly with LoRA, rank.

Minitron's lesson: pruning scores alone rank candidates badly, a short retraining stabilises the ranking (about
300 steps). So every candidate is pruned from the cached importance scores, scored on held-out text (perplexity),
retrained with LoRA adapters (peft) through the distillation trainer for `search.tokens` tokens, and scored again;
candidates are ranked by the second score. Each adapter is saved with the fingerprint of the pruned base it was
trained on (`adapter_base.json`), so it can only be merged into that exact base (peft #1746: an adapter loaded on
the wrong base silently does nothing); the winner's adapter is merged or discarded before full distillation.

Run alone: `hf-minitron search --recipe R --member NAME` (the build's importance and search stages only).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .archs import count_parameters, get_arch, head_dim, intermediate_size, num_kv_heads
from .cost import train_flops
from .prune import PruneTarget, prune_model, student_config
from .rundir import SEARCH_FILE, StageOutput, hash_folder

TABLE_FILE, ADAPTER_BASE_FILE = "search.md", "adapter_base.json"  # SEARCH_FILE: rundir.py


@dataclass
class SearchConfig:
    """Candidate shapes near a budget, each pruned, briefly LoRA-retrained by distillation and scored."""

    tolerance: float = field(default=0.05, metadata={"help": "candidates within this share of the budget (paper: 5%)"})
    multiple: int = field(default=64, metadata={"help": "hidden and MLP sizes are multiples of this"})
    min_width: float = field(default=0.5, metadata={"help": "smallest hidden/MLP/head share of the base model tried"})
    depth: bool = field(default=False, metadata={"help": "also vary the layer count (widths only by default)"})
    min_depth: float = field(default=0.5, metadata={"help": "smallest share of the base model's layers tried"})
    max_candidates: int = field(default=8, metadata={"help": "keep the candidates nearest to the budget"})
    tokens: int = field(default=1_000_000, metadata={
        "help": "LoRA retraining tokens per candidate (paper: rankings settle after ~300 steps)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per retraining window"})
    batch_size: int = field(default=4, metadata={"help": "windows per retraining step"})
    lr: float = field(default=1e-4, metadata={"help": "LoRA learning rate"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_target: str = field(default="all-linear", metadata={"help": "modules given adapters (peft target_modules)"})
    eval_windows: int = field(default=8, metadata={"help": "held-out windows each candidate is scored on"})
    eval_seq_len: int = field(default=512, metadata={"help": "tokens per scoring window"})
    adapter: Literal["merge", "discard"] = field(default="discard", metadata={
        "help": "the winner's adapter: merge it into the pruned weights, or discard it before distillation"})

    def check(self, key: str = "search") -> None:
        """Ranges the types cannot say; a one-line error naming the key."""
        for ok, what in ((0 < self.tolerance < 1, f"tolerance: must be in (0, 1), got {self.tolerance}"),
                         (self.multiple >= 1, f"multiple: must be >= 1, got {self.multiple}"),
                         (0 < self.min_width <= 1, f"min_width: must be in (0, 1], got {self.min_width}"),
                         (0 < self.min_depth <= 1, f"min_depth: must be in (0, 1], got {self.min_depth}"),
                         (self.max_candidates >= 1, f"max_candidates: must be >= 1, got {self.max_candidates}")):
            if not ok:
                raise ValueError(f"{key}.{what}")


@dataclass
class Candidate:
    """One shape near the budget and what the search measured on it (perplexity: lower is better)."""

    shape: dict  # hidden_size, ffn_size, num_heads, num_kv_heads, num_layers
    params: int
    score_before: float | None = None
    score_after: float | None = None
    tokens: int = 0
    rank: int | None = None

    def target(self) -> PruneTarget:
        return PruneTarget(**self.shape)


def _grid(full: int, multiple: int, low: float) -> list[int]:
    """Multiples of `multiple` from low*full to full, plus full itself."""
    values = [v for v in range(multiple, full + 1, multiple) if v >= low * full]
    return sorted(set(values) | {full})


def _count(config, shape: dict) -> int:
    """Parameters of a shape, on a shallow copy of the config (fast enough to call for every grid point)."""
    c = copy.copy(config)
    c.hidden_size, c.num_attention_heads = shape["hidden_size"], shape["num_heads"]
    c.num_key_value_heads, c.num_hidden_layers = shape["num_kv_heads"], shape["num_layers"]
    c.head_dim = head_dim(config)
    setattr(c, get_arch(config).intermediate_key, shape["ffn_size"])
    return count_parameters(c)


def enumerate_candidates(config, budget: int, tolerance: float = 0.05, multiple: int = 64, min_width: float = 0.5,
                         depth: bool = False, min_depth: float = 0.5, max_candidates: int = 8) -> list[Candidate]:
    """Shapes within budget*(1 +- tolerance), nearest first, at most `max_candidates`.

    Hidden and MLP sizes are multiples of `multiple` (or the base's own size); query heads keep the base's KV
    groups with the same number of heads in each; the layer count varies only with `depth`. For each (hidden,
    heads, layers) the MLP size nearest to the budget is kept, so candidates differ in more than the MLP.
    """
    heads, kv, layers = config.num_attention_heads, num_kv_heads(config), config.num_hidden_layers
    group = heads // kv
    if group > 1:
        head_options = [(kv * g, kv) for g in range(1, group + 1) if kv * g >= min_width * heads]
    else:  # MHA: each head is its own KV group
        head_options = [(h, h) for h in range(1, heads + 1) if h >= min_width * heads]
    layer_options = range(max(1, math.ceil(min_depth * layers)), layers + 1) if depth else [layers]
    ffn_options = _grid(intermediate_size(config), multiple, min_width)
    lo, hi = budget * (1 - tolerance), budget * (1 + tolerance)
    found: list[Candidate] = []
    for hidden in _grid(config.hidden_size, multiple, min_width):
        for n_heads, n_kv in head_options:
            for n_layers in layer_options:
                shape = dict(hidden_size=hidden, ffn_size=ffn_options[0], num_heads=n_heads, num_kv_heads=n_kv,
                             num_layers=n_layers)
                p0 = _count(config, shape)
                slope = (_count(config, {**shape, "ffn_size": ffn_options[0] + 1}) - p0)
                best = min(ffn_options, key=lambda f: abs(p0 + slope * (f - ffn_options[0]) - budget))
                params = p0 + slope * (best - ffn_options[0])
                if lo <= params <= hi and _accepted(config, {**shape, "ffn_size": best}):
                    found.append(Candidate({**shape, "ffn_size": best}, params))
    found.sort(key=lambda c: (abs(c.params - budget), -c.shape["hidden_size"]))
    return found[:max_candidates]


def _accepted(config, shape: dict) -> bool:
    """Whether the config class accepts the shape (some demand hidden % heads == 0 even with head_dim set)."""
    try:
        student_config(config, PruneTarget(**shape))
        return True
    except Exception:  # transformers' and huggingface_hub's validation errors share no base but Exception
        return False


def candidates_for(config, budget: int, search) -> list[Candidate]:
    """`enumerate_candidates` with a recipe's `search` section; a one-line error when nothing fits."""
    found = enumerate_candidates(config, budget, search.tolerance, search.multiple, search.min_width, search.depth,
                                 search.min_depth, search.max_candidates)
    if not found:
        raise ValueError(f"no shape within {search.tolerance:.0%} of {budget:,} parameters (base model: "
                         f"{count_parameters(config):,}; multiple {search.multiple}, min_width {search.min_width}, "
                         f"depth {'on' if search.depth else 'off'})")
    return found


def fingerprint(model) -> str:
    """sha256 over the model's tensors (names, shapes, bytes): identifies the exact base of an adapter."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lora_retrain(student, teacher, tokenizer, dataset, search, out: Path, seed: int = 0, progress: bool = True):
    """Wrap `student` in LoRA adapters, distil `teacher` into them for search.tokens tokens -> (peft model, tokens)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from .distill import DistillConfig, MinitronDistillTrainer

    per_step = search.batch_size * search.seq_len
    steps = max(1, math.ceil(search.tokens / per_step))
    lora = LoraConfig(r=search.lora_r, lora_alpha=search.lora_alpha, target_modules=search.lora_target,
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    set_seed(seed)  # the adapters' init: the same in every process, whatever ran before
    model = get_peft_model(student, lora)
    args = DistillConfig(output_dir=str(out / "trainer"), max_steps=steps,
                         per_device_train_batch_size=search.batch_size,
                         max_length=search.seq_len, learning_rate=search.lr, save_strategy="no", report_to=[],
                         logging_steps=max(1, steps // 5), gradient_checkpointing=False, seed=seed,
                         disable_tqdm=not progress, kd_chunk_tokens=1024)
    trainer = MinitronDistillTrainer(model, teacher, args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    shutil.rmtree(out / "trainer", ignore_errors=True)
    model.eval()
    return model, steps * per_step


def save_adapter(peft_model, folder: Path, base_fingerprint: str, base_path: str, shape: dict) -> None:
    """The adapter plus the fingerprint of the pruned base it belongs to."""
    peft_model.peft_config["default"].base_model_name_or_path = base_path
    peft_model.save_pretrained(folder)
    (folder / ADAPTER_BASE_FILE).write_text(json.dumps(
        {"base": base_path, "base_sha256": base_fingerprint, "shape": shape}, indent=1) + "\n")


def merge_adapter(base_model, folder: str | Path):
    """Merge a search adapter into the pruned base it was trained on; refuse any other base."""
    from peft import PeftModel

    folder = Path(folder)
    bound = json.loads((folder / ADAPTER_BASE_FILE).read_text())
    actual = fingerprint(base_model)
    if bound["base_sha256"] != actual:
        raise ValueError(f"adapter in {str(folder)!r} was trained on another base (sha256 {bound['base_sha256'][:12]}, "
                         f"this one {actual[:12]}); refusing to merge it")
    return PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()


def format_table(candidates: list[Candidate], budget: int) -> str:
    rows = ["| rank | hidden | ffn | heads/kv | layers | params | vs budget | ppl before | ppl after |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(candidates, key=lambda c: c.rank or 1 << 30):
        s = c.shape
        rows.append(f"| {c.rank or '-'} | {s['hidden_size']} | {s['ffn_size']} | {s['num_heads']}/{s['num_kv_heads']} "
                    f"| {s['num_layers']} | {c.params / 1e6:,.2f}M | {c.params / budget - 1:+.1%} | "
                    f"{_fmt(c.score_before)} | {_fmt(c.score_after)} |")
    return "\n".join(rows)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def run_search(base_model, scores, teacher, tokenizer, dataset, windows: torch.Tensor, budget: int,
               search: SearchConfig, out, prune_options=None, base_path: str = "", seed: int = 0,
               progress: bool = True, log=print) -> StageOutput:
    """Prune, score, LoRA-retrain and re-score every candidate; write search.json and search.md into `out`.

    Candidates already scored in `out/search.json` (an interrupted search) are not redone. The output's record
    holds the winner's shape and the FLOPs spent.
    """
    from .evaluate import perplexity

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = candidates_for(base_model.config, budget, search)
    state_path = out / SEARCH_FILE
    done = {}
    if state_path.is_file():
        done = {json.dumps(c["shape"], sort_keys=True): c for c in json.loads(state_path.read_text())["candidates"]}
    for i, cand in enumerate(tqdm(candidates, desc="search candidates", disable=not progress)):
        prior = done.get(json.dumps(cand.shape, sort_keys=True))
        if prior and prior.get("score_after") is not None and (search.adapter == "discard"
                                                               or (out / f"candidate-{i}").is_dir()):
            cand.score_before, cand.score_after = prior["score_before"], prior["score_after"]
            cand.tokens = prior["tokens"]
            continue
        student, _ = prune_model(base_model, scores, cand.target(), prune_options)
        base_fp = fingerprint(student)
        cand.score_before = perplexity(student, windows)
        peft_model, cand.tokens = lora_retrain(student, teacher, tokenizer, dataset, search, out, seed, progress)
        cand.score_after = perplexity(peft_model, windows)
        save_adapter(peft_model, out / f"candidate-{i}", base_fp, base_path, cand.shape)
        log(f"  candidate {i}: {cand.params / 1e6:.2f}M params, "
            f"ppl {cand.score_before:,.2f} -> {cand.score_after:,.2f}")
        _write(state_path, candidates, budget, search, None)
        del student, peft_model
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].score_after, candidates[i].score_before))
    for rank, i in enumerate(order, 1):
        candidates[i].rank = rank
    winner = order[0]
    adapter_dir = out / "adapter"
    if search.adapter == "merge":
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(out / f"candidate-{winner}", adapter_dir)
    for i in range(len(candidates)):  # the other adapters (and the winner's when discarded) are not needed again
        shutil.rmtree(out / f"candidate-{i}", ignore_errors=True)
    result = _write(state_path, candidates, budget, search, winner)
    table = format_table(candidates, budget)
    (out / TABLE_FILE).write_text(table + "\n")
    log(table)
    n_teacher = count_parameters(teacher.config)
    flops = sum(train_flops(c["params"], c["tokens"], n_teacher) for c in result["candidates"])
    return StageOutput(out, hash_folder(out), tokens={"search": result["tokens"]},
                       record={"flops": flops, "winner": result["winner"]["shape"]})


def _write(path: Path, candidates: list[Candidate], budget: int, search, winner: int | None) -> dict:
    result = {"budget": budget, "tolerance": search.tolerance, "score": "perplexity on held-out text (lower is better)",
              "retrain_tokens_per_candidate": search.tokens, "adapter": search.adapter,
              "candidates": [asdict(c) for c in candidates],
              "winner": None if winner is None else asdict(candidates[winner]),
              "tokens": sum(c.tokens for c in candidates)}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result
