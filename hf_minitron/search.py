"""Architecture search for a parameter budget: enumerate shapes, prune each, retrain briefly by distillation, rank.

Minitron's lesson: pruning scores alone rank candidates badly, a short retraining stabilises the ranking (paper
Fig. 9: after about 300 steps). So every candidate in the search space (`search_space.py`, paper Table 12) is pruned
from the cached importance scores and scored on held-out text (perplexity); then all candidates are retrained in
turns of `eval_every` tokens (`search_train.py`: LoRA plus norms by default, or every parameter) and scored again
after each turn. Each turn's ranking is compared with the previous one (Kendall tau); once it has not changed for
`stable_evals` turns the search stops early. search.md shows the candidates and the ranking at every turn. The
winner's adapter (or weights) is kept for the prune stage to apply, or discarded, before full distillation.

Run alone: `hf-minitron search --recipe R --member NAME` (the build's importance and search stages only).
Under `accelerate launch` every process prunes each candidate and trains it (DDP, `batch_size` windows per step in
all), the held-out windows are scored in shares and summed, so every process ranks alike; the main process writes.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from . import ranks
from .archs import count_parameters
from .cost import train_flops
from .prune import prune_model
from .rundir import SEARCH_FILE, StageOutput, hash_folder
from .search_space import Candidate, candidates_for, enumerate_candidates  # noqa: F401 (also the search's API)
from .search_train import (ADAPTER_BASE_FILE, fingerprint, keep_weights, merge_adapter, per_process_batch,  # noqa: F401
                           train_segment, wrap)

TABLE_FILE = "search.md"  # SEARCH_FILE: rundir.py


@dataclass
class SearchConfig:
    """Candidate shapes near a budget (per-axis value lists), each pruned, briefly retrained by distillation, ranked."""

    tolerance: float = field(default=0.05, metadata={"help": "candidates within this share of the budget (paper: 5%)"})
    multiple: int = field(default=64, metadata={"help": "hidden and MLP sizes are multiples of this"})
    min_width: float = field(default=0.5, metadata={
        "help": "smallest hidden size, head count and MLP size tried, as a share of the base model's"})
    hidden_sizes: list[int] | None = field(default=None, metadata={
        "help": "hidden sizes tried (None: multiples of `multiple` from min_width x the base's)"})
    num_heads: list[int] | None = field(default=None, metadata={
        "help": "query-head counts tried, multiples of the KV-head count (None: each one from min_width x the base's)"})
    ffn_sizes: list[int] | None = field(default=None, metadata={
        "help": "MLP sizes tried (None: multiples of `multiple` from min_width x the base's)"})
    mlp_ratios: list[float] | None = field(default=None, metadata={
        "help": "MLP expansion factors tried instead of ffn_sizes, as the paper's Table 12: MLP size = factor x "
                "hidden size, rounded to `multiple`"})
    depth: bool = field(default=False, metadata={"help": "also vary the layer count (widths only by default)"})
    min_depth: float = field(default=0.5, metadata={"help": "smallest share of the base model's layers tried"})
    num_layers: list[int] | None = field(default=None, metadata={
        "help": "layer counts tried with depth (None: from min_depth x the base's to all of them)"})
    max_candidates: int = field(default=8, metadata={
        "help": "candidates retrained; more feasible shapes are thinned to the ones that differ most"})
    mode: Literal["lora", "full"] = field(default="lora", metadata={
        "help": "retrain LoRA adapters (plus lora_also_train), or every parameter as the paper did"})
    lora_also_train: Literal["norms+embeddings", "norms", "none"] = field(default="norms+embeddings", metadata={
        "help": "trained in full alongside LoRA, what hidden-size pruning disturbs: every norm, and the embeddings "
                "(and an untied LM head) of shapes whose hidden size is pruned"})
    tokens: int = field(default=1_000_000, metadata={
        "help": "most retraining tokens per candidate (paper: rankings settle after ~300 steps); 0: no retraining, "
                "candidates ranked by their perplexity after pruning alone (bench/paper's search experiment found "
                "that order agreed with a longer KD's on SmolLM2; the paper found it unreliable in general)"})
    eval_every: int | None = field(default=None, metadata={
        "help": "retraining tokens between two rankings of all candidates (None: a quarter of `tokens`)"})
    stable_evals: int = field(default=2, metadata={
        "help": "stop once the ranking has not changed for this many evaluations (Kendall tau 1); 0: never early"})
    seq_len: int = field(default=512, metadata={"help": "tokens per retraining window"})
    batch_size: int = field(default=4, metadata={"help": "windows per retraining step"})
    lr: float = field(default=1e-4, metadata={"help": "retraining learning rate"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_target: str = field(default="all-linear", metadata={"help": "modules given adapters (peft target_modules)"})
    eval_windows: int = field(default=8, metadata={"help": "held-out windows each candidate is scored on"})
    eval_seq_len: int = field(default=512, metadata={"help": "tokens per scoring window"})
    adapter: Literal["merge", "discard"] = field(default="discard", metadata={
        "help": "the winner's adapter (or retrained weights, mode full): apply it to the pruned weights, or "
                "discard it before distillation"})

    def check(self, key: str = "search") -> None:
        """Ranges the types cannot say; a one-line error naming the key."""
        lists = {"hidden_sizes": self.hidden_sizes, "num_heads": self.num_heads, "num_layers": self.num_layers,
                 "ffn_sizes": self.ffn_sizes, "mlp_ratios": self.mlp_ratios}
        for ok, what in ((0 < self.tolerance < 1, f"tolerance: must be in (0, 1), got {self.tolerance}"),
                         (self.multiple >= 1, f"multiple: must be >= 1, got {self.multiple}"),
                         (0 < self.min_width <= 1, f"min_width: must be in (0, 1], got {self.min_width}"),
                         (0 < self.min_depth <= 1, f"min_depth: must be in (0, 1], got {self.min_depth}"),
                         (self.max_candidates >= 1, f"max_candidates: must be >= 1, got {self.max_candidates}"),
                         (self.depth or not self.num_layers, "num_layers: set depth: true to vary the layer count"),
                         (not (self.ffn_sizes and self.mlp_ratios), "mlp_ratios: give MLP sizes or factors, not both"),
                         (self.eval_every is None or self.eval_every >= 1,
                          f"eval_every: must be >= 1 token, got {self.eval_every}"),
                         (self.stable_evals >= 0, f"stable_evals: must be >= 0, got {self.stable_evals}"),
                         (self.tokens >= 0, f"tokens: must be >= 0 (0: no retraining), got {self.tokens}"),
                         *((all(v > 0 for v in values or []), f"{name}: values must be > 0, got {values}")
                           for name, values in lists.items())):
            if not ok:
                raise ValueError(f"{key}.{what}")


def eval_steps(search: SearchConfig) -> tuple[list[int], int]:
    """(the steps after which every candidate is scored, tokens per step): every `eval_every` tokens and the end;
    no steps when the search does not retrain (`tokens` 0)."""
    per_step = search.batch_size * search.seq_len
    if not search.tokens:
        return [], per_step
    steps = max(1, math.ceil(search.tokens / per_step))
    every = max(1, math.ceil((search.eval_every or math.ceil(search.tokens / 4)) / per_step))
    return sorted({*range(every, steps, every), steps}), per_step


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists (1: the same order; -1: reversed); 1 for fewer than two."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    if not pairs:
        return 1.0
    sign = [(a[i] > a[j]) - (a[i] < a[j]) for i, j in pairs]
    return sum(s * ((b[i] > b[j]) - (b[i] < b[j])) for s, (i, j) in zip(sign, pairs)) / len(pairs)


def rankings(candidates: list[Candidate]) -> list[dict]:
    """The ranking after each interval every candidate has reached (interval 0: pruned, not retrained), with
    Kendall's tau against the previous one."""
    rows, previous = [], None
    done = min(len(c.curve) for c in candidates) if all(c.score_before is not None for c in candidates) else -1
    for k in range(done + 1):
        scores = [c.score_before if k == 0 else c.curve[k - 1]["perplexity"] for c in candidates]
        point = candidates[0].curve[k - 1] if k else {"step": 0, "tokens": 0}
        rows.append({"step": point["step"], "tokens": point["tokens"], "perplexity": scores,
                     "order": sorted(range(len(scores)), key=lambda i: (scores[i], i)),
                     "kendall_tau": None if previous is None else kendall_tau(previous, scores)})
        previous = scores
    return rows


def settled(rows: list[dict], stable_evals: int) -> bool:
    """Whether the retrained ranking held for `stable_evals` evaluations in a row (pruned-only scores not counted)."""
    taus = [r["kendall_tau"] for r in rows[2:]]  # tau between two retrained rankings
    return 0 < stable_evals <= len(taus) and all(t == 1.0 for t in taus[-stable_evals:])


def format_table(candidates: list[Candidate], budget: int) -> str:
    rows = ["| rank | id | hidden | ffn | heads/kv | layers | params | vs budget | ppl before | ppl after | tokens |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, c in sorted(enumerate(candidates, 1), key=lambda ic: ic[1].rank or 1 << 30):
        s = c.shape
        rows.append(f"| {c.rank or '-'} | c{i} | {s['hidden_size']} | {s['ffn_size']} | {s['num_heads']}/"
                    f"{s['num_kv_heads']} | {s['num_layers']} | {c.params / 1e6:,.2f}M | {c.params / budget - 1:+.1%} "
                    f"| {_fmt(c.score_before)} | {_fmt(c.score_after)} | {c.tokens:,} |")
    return "\n".join(rows)


def format_curve(rows: list[dict], note: str) -> str:
    """The ranking at every interval (paper Fig. 9): each candidate's perplexity, the order, Kendall's tau."""
    n = len(rows[0]["perplexity"]) if rows else 0
    ids = [f"c{i}" for i in range(1, n + 1)]
    lines = [f"| step | tokens | {' | '.join(ids)} | ranking | Kendall tau |",
             "|---:|---:|" + "---:|" * n + "---|---:|"]
    for r in rows:
        tau = "-" if r["kendall_tau"] is None else f"{r['kendall_tau']:.2f}"
        lines.append(f"| {r['step']} | {r['tokens']:,} | {' | '.join(_fmt(p) for p in r['perplexity'])} | "
                     f"{' > '.join(ids[i] for i in r['order'])} | {tau} |")
    return "\n".join(lines + ["", note])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def _restore(candidates: list[Candidate], out: Path, search: SearchConfig) -> None:
    """Scores of an interrupted search (search.json), for candidates whose last checkpoint is still there (or all
    of them, when the search had finished and its winner's weights are kept or not wanted)."""
    path = out / SEARCH_FILE
    if not path.is_file():
        return
    state = json.loads(path.read_text())
    done = {json.dumps(c["shape"], sort_keys=True): c for c in state["candidates"]}
    kept = out / "adapter" / ADAPTER_BASE_FILE
    finished = state.get("winner") is not None and (search.adapter == "discard" or not search.tokens or (
        kept.is_file() and json.loads(kept.read_text())["shape"] == state["winner"]["shape"]))
    for c in candidates:
        prior = done.get(json.dumps(c.shape, sort_keys=True))
        if not prior or prior.get("base_sha256") is None:
            continue
        c.score_before, c.base_sha256 = prior["score_before"], prior["base_sha256"]
        if finished or (prior["curve"] and _checkpoint(out, c, prior["curve"][-1]["step"]).is_dir()):
            c.curve = prior["curve"]


def _checkpoint(out: Path, c: Candidate, step: int) -> Path:
    return out / f"candidate-{c.name}" / f"checkpoint-{step}"


def score(model, windows) -> float:
    """Held-out perplexity; under `accelerate launch` each process scores every world-th window and the sums are
    added up, so every process has the same score (and takes the same decisions from it)."""
    from .evaluate import nll_sum

    nll, tokens = ranks.sum_across(list(nll_sum(model, windows[ranks.index()::ranks.world()])))
    return math.exp(nll / tokens)


def run_search(base_model, scores, teacher, tokenizer, dataset, windows, budget: int, search: SearchConfig, out,
               prune_options=None, base_path: str = "", seed: int = 0, progress: bool = True,
               log=print) -> StageOutput:
    """Prune and score every candidate, then retrain and re-score them all in turns until the ranking settles or
    the token budget is spent; write search.json and search.md into `out`. `teacher`: a loaded model, or a
    `TeacherCache` whose windows and top-K the candidates then train on (`dataset` unused).

    Resumable: search.json is written after every candidate's turn, and a candidate continues from its last
    checkpoint. The output's record holds the winner's shape and the FLOPs spent.
    """
    from .cached_distill import TeacherCache

    out = Path(out)
    per_process_batch(search.batch_size)  # fails now, not after the first candidate's scoring
    candidates = candidates_for(base_model.config, budget, search)
    stops, per_step = eval_steps(search)

    def restored() -> list[Candidate]:
        out.mkdir(parents=True, exist_ok=True)
        _restore(candidates, out, search)
        return candidates

    candidates = ranks.on_main(restored)  # every process resumes from the main one's view

    def pruned(c: Candidate):
        """The candidate pruned from the base; its fingerprint and pruned score recorded the first time."""
        student, _ = prune_model(base_model, scores, c.target(), prune_options)
        if c.score_before is None or c.base_sha256 is None:
            c.base_sha256, c.score_before = ranks.on_main(fingerprint, student), score(student, windows)
        return student

    if not stops:  # no retraining: each candidate is pruned and scored once
        for c in tqdm([c for c in candidates if c.score_before is None or c.base_sha256 is None],
                      desc="scoring pruned candidates", disable=not progress):
            student = pruned(c)
            log(f"  candidate {c.name}: {c.params / 1e6:.2f}M params, ppl {c.score_before:,.2f} after pruning")
            ranks.on_main(_write, out, candidates, budget, search, None)
            del student
    cache, rows = {}, rankings(candidates)
    for k, stop in enumerate(stops, 1):
        if settled(rows, search.stable_evals):
            break
        for c in tqdm([c for c in candidates if len(c.curve) < k], desc=f"search step {stop}", disable=not progress):
            student = pruned(c)
            start = c.curve[-1]["step"] if c.curve else 0
            model = wrap(student, search, base_model.config, seed)
            train_segment(model, teacher, tokenizer, dataset, search, out / f"candidate-{c.name}", stops[-1], stop,
                          _checkpoint(out, c, start) if start else None, seed, progress, cache)
            c.curve.append({"step": stop, "tokens": stop * per_step, "perplexity": score(model, windows)})
            log(f"  candidate {c.name}: {c.params / 1e6:.2f}M params, step {stop}/{stops[-1]}, "
                f"ppl {c.score_before:,.2f} -> {c.curve[-1]['perplexity']:,.2f}")
            ranks.on_main(_write, out, candidates, budget, search, None)
            if start:
                ranks.on_main(shutil.rmtree, _checkpoint(out, c, start), ignore_errors=True)
            del student, model
        rows = rankings(candidates)
        r = rows[-1]
        log(f"  step {stop}: ranking {' > '.join(f'c{i + 1}' for i in r['order'])}"
            + ("" if r["kendall_tau"] is None else f" (Kendall tau {r['kendall_tau']:.2f} vs the previous)"))
    for c in candidates:
        c.score_after, c.tokens = (c.curve[-1]["perplexity"], c.curve[-1]["tokens"]) if c.curve else (c.score_before, 0)
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].score_after, candidates[i].score_before))
    for rank, i in enumerate(order, 1):
        candidates[i].rank = rank
    winner = candidates[order[0]]
    note = _settle_note(rows, stops, search)
    table = format_table(candidates, budget) + "\n\nRanking after each retraining interval:\n\n"
    table += format_curve(rows, note)

    def finish() -> tuple[dict, str]:
        checkpoint = _checkpoint(out, winner, winner.curve[-1]["step"]) if winner.curve else None
        if search.adapter == "merge" and checkpoint and checkpoint.is_dir():
            keep_weights(checkpoint, out / "adapter", winner.base_sha256, base_path, winner.shape, search.mode)
        result = _write(out, candidates, budget, search, order[0], rows, note)
        for c in candidates:  # the checkpoints are not needed again
            shutil.rmtree(out / f"candidate-{c.name}", ignore_errors=True)
        (out / TABLE_FILE).write_text(table + "\n")
        return result, hash_folder(out)

    result, sha256 = ranks.on_main(finish)
    log(table)
    n_teacher = 0 if isinstance(teacher, TeacherCache) else count_parameters(teacher.config)  # a cache: counted once
    flops = sum(train_flops(c["params"], c["tokens"], n_teacher) for c in result["candidates"])
    return StageOutput(out, sha256, tokens={"search": result["tokens"]},
                       record={"flops": flops, "winner": result["winner"]["shape"]})


def settled_at(rows: list[dict]) -> int | None:
    """The step from which the retrained ranking never changed again; None with fewer than two retrained rankings
    or when it still changed at the last one."""
    i = len(rows) - 1
    while i > 1 and rows[i]["kendall_tau"] == 1.0:
        i -= 1
    return rows[i]["step"] if len(rows) > 2 and i < len(rows) - 1 else None


def _settle_note(rows: list[dict], stops: list[int], search: SearchConfig) -> str:
    last, at = rows[-1]["step"], settled_at(rows)
    if not stops:
        return "No retraining (search.tokens 0): ranked by perplexity after pruning alone."
    if at is None:
        return (f"Ranking not settled: it still changed at step {last}, the last evaluation; raise search.tokens "
                f"or lower search.eval_every to see it settle." if len(rows) > 2 else
                "One retrained evaluation only: no stability check (lower search.eval_every).")
    held = f"Ranking settled at step {at} and held to step {last}"
    if last < stops[-1]:
        return f"{held}: stopped early after {search.stable_evals} unchanged evaluations ({last} of {stops[-1]} steps)."
    return f"{held}, the end of the budget ({stops[-1]} steps)."


def _write(out: Path, candidates: list[Candidate], budget: int, search: SearchConfig, winner: int | None,
           rows: list[dict] | None = None, note: str | None = None) -> dict:
    result = {"budget": budget, "tolerance": search.tolerance, "score": "perplexity on held-out text (lower is better)",
              "mode": search.mode, "retrain_tokens_per_candidate": search.tokens, "adapter": search.adapter,
              "candidates": [asdict(c) for c in candidates],
              "winner": None if winner is None else asdict(candidates[winner]),
              "rankings": rows or [], "settled_at_step": settled_at(rows or []), "settled": note,
              "tokens": sum(c.curve[-1]["tokens"] if c.curve else 0 for c in candidates)}
    (out / SEARCH_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result
