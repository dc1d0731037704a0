"""Minitron importance estimation: forward passes only, activation hooks, no gradients.

Width: attention heads (norm of each head's output before the output projection), MLP neurons (activation
entering the down projection), embedding channels (outputs of every hidden-size norm, summed over norms).
Depth: perplexity increase when a layer (or a run of layers) is skipped, and Block Importance
BI = 1 - cos(input, output) of a block or a contiguous run of blocks.

One calibration pass stores running sums for all nine (batch x sequence) aggregations of the paper's Table 13
grid, so any aggregation can be chosen at prune time without calibrating again. Under `accelerate launch`
batches are split across ranks and the sums all-reduced: the scores equal a single-process run.

Run alone: `hf-minitron importance --teacher T --data D --samples N --seq-len L --out SCORES`.
"""

from __future__ import annotations

import json
import math
import os
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .archs import count_parameters, get_arch, head_dim
from .cost import forward_flops
from .rundir import IMPORTANCE_FILE, StageOutput, hash_folder

DEPTH_METRICS = ("ppl", "bi", "bi-run")
SCORES_FILE, META_FILE = "importance.safetensors", IMPORTANCE_FILE


Aggregation = Literal["mean", "l2", "var"]
AGGREGATIONS = typing.get_args(Aggregation)


@dataclass
class ImportanceConfig:
    """How to calibrate: how much text, which depth metrics, which aggregation is recorded as the default."""

    samples: int = field(default=1024, metadata={"help": "calibration sequences (paper: 1024)"})
    seq_len: int = field(default=4096, metadata={"help": "tokens per calibration sequence"})
    batch_size: int = field(default=1, metadata={"help": "sequences per forward pass"})
    batch_agg: Aggregation = field(default="l2", metadata={
        "help": "aggregation over the batch recorded as the default (all nine batch x sequence pairs are stored; "
                "prune can pick another)"})
    seq_agg: Aggregation = field(default="mean", metadata={
        "help": "aggregation over the sequence recorded as the default"})
    depth_ppl_samples: int = field(default=64, metadata={
        "help": "sequences for the perplexity-drop layer metric (one extra pass per layer); 0 disables it"})
    depth_ppl_runs: list[int] = field(default_factory=lambda: [1], metadata={
        "help": "run lengths of consecutive layers scored by the perplexity-drop metric"})
    bi_max_run: int | None = field(default=None, metadata={
        "help": "longest contiguous run scored by Block Importance (none: half the layers)"})
    seed: int = field(default=0, metadata={"help": "seed for picking calibration windows"})


def _moments(a: torch.Tensor) -> torch.Tensor:
    """Per-sample sequence aggregations of non-negative values a [B, S, U] -> [3 (mean, l2, var), B, U]."""
    a = a.float()
    s1 = a.sum(1)
    s2 = (a * a).sum(1)
    n = a.shape[1]
    mean = s1 / n
    return torch.stack([mean, s2.sqrt(), (s2 / n - mean * mean).clamp_min(0)])


class _Accumulator:
    """Running sum and sum of squares over samples, for each sequence aggregation: [2, 3, *units] float64."""

    def __init__(self, *units: int, device):
        self.stats = torch.zeros(2, 3, *units, dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, index=None) -> None:  # values [3, B, U]
        v = values.double()
        target = self.stats if index is None else self.stats[:, :, index]
        target[0] += v.sum(1)
        target[1] += (v * v).sum(1)


def aggregate(stats: torch.Tensor, num_samples: int, batch_agg: str, seq_agg: str) -> torch.Tensor:
    """Scores from accumulated [2, 3, ...] stats for one (batch, sequence) aggregation pair."""
    if batch_agg not in AGGREGATIONS or seq_agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation batch={batch_agg!r} seq={seq_agg!r}; choose from {AGGREGATIONS}")
    s = AGGREGATIONS.index(seq_agg)
    total, total_sq = stats[0, s], stats[1, s]
    if batch_agg == "mean":
        return total / num_samples
    if batch_agg == "l2":
        return total_sq.sqrt()
    return (total_sq / num_samples - (total / num_samples) ** 2).clamp_min(0)


@dataclass
class ImportanceScores:
    """Accumulated calibration statistics plus metadata; `heads()` etc. turn them into scores."""

    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def num_samples(self) -> int:
        return int(self.meta["samples"])

    def _agg(self, key: str, batch_agg: str | None, seq_agg: str | None) -> torch.Tensor:
        return aggregate(self.tensors[key], self.num_samples, batch_agg or self.meta["aggregation"]["batch"],
                         seq_agg or self.meta["aggregation"]["seq"])

    def heads(self, batch_agg=None, seq_agg=None) -> torch.Tensor:
        """[layers, heads]"""
        return self._agg("heads", batch_agg, seq_agg)

    def neurons(self, batch_agg=None, seq_agg=None) -> torch.Tensor:
        """[layers, ffn]"""
        return self._agg("neurons", batch_agg, seq_agg)

    def channels(self, batch_agg=None, seq_agg=None) -> torch.Tensor:
        """[hidden]: per-norm scores summed over all norm layers."""
        return self._agg("channels", batch_agg, seq_agg).sum(0)

    def block_importance(self, run: int = 1) -> torch.Tensor:
        """[layers - run + 1]: 1 - mean cosine(input of layer i, output of layer i + run - 1)."""
        bi = self.tensors["bi"]
        if not 1 <= run <= bi.shape[0]:
            raise ValueError(f"Block Importance was computed for runs of 1..{bi.shape[0]} layers, not {run}")
        return bi[run - 1, : bi.shape[1] - run + 1]

    def perplexity_increase(self, run: int = 1) -> torch.Tensor:
        """[layers - run + 1]: perplexity with layers i..i+run-1 skipped, minus the full model's."""
        runs = self.meta.get("depth_ppl_runs", [])
        if run not in runs or "ppl_nll" not in self.tensors:
            raise ValueError(f"perplexity-drop scores exist for runs {runs or 'none'} (depth_ppl_samples=0?), "
                             f"not for run {run}; re-run importance with --depth-ppl-runs {run}")
        count = float(self.tensors["ppl_tokens"])
        nll = self.tensors["ppl_nll"][runs.index(run)]
        n_layers = nll.shape[0] - run + 1
        return torch.exp(nll[:n_layers] / count) - math.exp(float(self.tensors["ppl_base_nll"]) / count)

    def layer_scores(self, metric: str) -> torch.Tensor:
        """Single-layer importance by a depth metric ('ppl' or 'bi'); higher = more important."""
        if metric == "ppl":
            return self.perplexity_increase(1)
        if metric in ("bi", "bi-run"):
            return self.block_importance(1)
        raise ValueError(f"unknown depth metric {metric!r}; choose from {', '.join(DEPTH_METRICS)}")

    def save(self, out: str | os.PathLike) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, str(out / SCORES_FILE))
        (out / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ImportanceScores":
        folder = Path(folder)
        if not (folder / META_FILE).is_file() or not (folder / SCORES_FILE).is_file():
            raise FileNotFoundError(f"no importance scores in {str(folder)!r} (expected {META_FILE} and {SCORES_FILE})")
        return cls(load_file(str(folder / SCORES_FILE)), json.loads((folder / META_FILE).read_text()))


@contextmanager
def _hooks(model, spec, acc: dict, hidden_states: list | None):
    """Register the width hooks (and, when `hidden_states` is a list, the layer-input capture for BI)."""
    hd = head_dim(model.config)
    handles = []
    layers = spec.decoder_layers(model)

    def head_hook(i):
        def hook(_module, args, kwargs=None):
            x = args[0]
            a = x.view(*x.shape[:-1], -1, hd).float().norm(dim=-1)  # [B, S, heads]
            acc["heads"].add(_moments(a), i)
        return hook

    def neuron_hook(i):
        def hook(_module, args):
            acc["neurons"].add(_moments(args[0].abs()), i)
        return hook

    def norm_hook(j):
        def hook(_module, _args, output):
            acc["channels"].add(_moments(output.abs()), j)
        return hook

    def capture(_module, args, kwargs):
        hidden_states.append(args[0] if args else kwargs["hidden_states"])

    def capture_last(_module, _args, _kwargs, output):
        hidden_states.append(output[0] if isinstance(output, tuple) else output)

    norm_idx = 0
    for i, layer in enumerate(layers):
        handles.append(spec.out_proj(layer).register_forward_pre_hook(head_hook(i)))
        handles.append(spec.down(layer).register_forward_pre_hook(neuron_hook(i)))
        for norm in spec.norms(layer):
            handles.append(norm.register_forward_hook(norm_hook(norm_idx)))
            norm_idx += 1
        if hidden_states is not None:
            handles.append(layer.register_forward_pre_hook(capture, with_kwargs=True))
    handles.append(model.get_submodule(spec.final_norm).register_forward_hook(norm_hook(norm_idx)))
    if hidden_states is not None:
        handles.append(layers[-1].register_forward_hook(capture_last, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skip_layers(model, indices):
    """Temporarily make decoder layers identity functions (for the perplexity-drop metric)."""
    layers = get_arch(model.config).decoder_layers(model)

    def identity(hidden_states, *args, **kwargs):
        return hidden_states

    for i in indices:
        layers[i].forward = identity
    try:
        yield
    finally:
        for i in indices:
            del layers[i].forward


def _add_block_importance(bi_sum: torch.Tensor, states: list[torch.Tensor], max_run: int) -> None:
    """bi_sum[run-1, i] += sum over tokens of 1 - cos(h_i, h_{i+run}), for every run length at once.

    Each token's state is normalised once; the summed cosines of every pair of depths are then one matrix product
    (a per-pair cosine_similarity loop costs hundreds of small kernels per batch).
    """
    n_layers = len(states) - 1
    tokens = states[0].numel() // states[0].shape[-1]
    unit = torch.stack([torch.nn.functional.normalize(h.float(), dim=-1, eps=1e-8).flatten() for h in states])
    cos_sum = (unit @ unit.T).double()  # [i, j] = sum over tokens of cos(h_i, h_j)
    for run in range(1, max_run + 1):
        i = torch.arange(n_layers - run + 1, device=cos_sum.device)
        bi_sum[run - 1, : n_layers - run + 1] += tokens - cos_sum[i, i + run]


def _nll_sum(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                             reduction="sum").double()


@torch.no_grad()
def compute_importance(model, input_ids: torch.Tensor, config: ImportanceConfig | None = None,
                       metadata: dict | None = None, progress: bool = True) -> ImportanceScores:
    """Score every width and depth unit of `model` on calibration sequences `input_ids` [samples, seq_len]."""
    from accelerate import PartialState
    from accelerate.utils import reduce

    config = config or ImportanceConfig()
    spec = get_arch(model.config)
    cfg = model.config
    device = next(model.parameters()).device
    state = PartialState(cpu=device.type == "cpu")  # cpu=True lets `accelerate launch` ranks use gloo on CPU
    n_layers = cfg.num_hidden_layers
    n_norms = n_layers * len(spec.layer_norms) + 1
    acc = {
        "heads": _Accumulator(n_layers, cfg.num_attention_heads, device=device),
        "neurons": _Accumulator(n_layers, spec.down(spec.decoder_layers(model)[0]).in_features, device=device),
        "channels": _Accumulator(n_norms, cfg.hidden_size, device=device),
    }
    max_run = config.bi_max_run or max(1, n_layers // 2)
    max_run = min(max_run, n_layers)
    bi_sum = torch.zeros(max_run, n_layers, dtype=torch.float64, device=device)
    ppl_runs = sorted(set(config.depth_ppl_runs)) if config.depth_ppl_samples > 0 else []
    ppl_nll = torch.zeros(len(ppl_runs), n_layers, dtype=torch.float64, device=device)
    ppl_base = torch.zeros((), dtype=torch.float64, device=device)
    ppl_tokens = torch.zeros((), dtype=torch.float64, device=device)

    samples, seq_len = input_ids.shape
    batches = [input_ids[i: i + config.batch_size] for i in range(0, samples, config.batch_size)]
    mine = list(range(state.process_index, len(batches), state.num_processes))
    model.eval()
    for b in tqdm(mine, desc="importance", disable=not (progress and state.is_main_process)):
        batch = batches[b].to(device)
        states: list[torch.Tensor] = []
        with _hooks(model, spec, acc, states):
            model(input_ids=batch)
        _add_block_importance(bi_sum, states, max_run)
        del states
        first = b * config.batch_size
        if ppl_runs and first < config.depth_ppl_samples:
            batch = batch[: config.depth_ppl_samples - first]
            ppl_base += _nll_sum(model, batch)
            ppl_tokens += batch[:, 1:].numel()
            for r, run in enumerate(ppl_runs):
                for i in range(n_layers - run + 1):
                    with skip_layers(model, range(i, i + run)):
                        ppl_nll[r, i] += _nll_sum(model, batch)

    tensors = {"heads": acc["heads"].stats, "neurons": acc["neurons"].stats, "channels": acc["channels"].stats,
               "bi": bi_sum / (samples * seq_len)}
    if ppl_runs:
        tensors.update(ppl_nll=ppl_nll, ppl_base_nll=ppl_base, ppl_tokens=ppl_tokens)
    if state.num_processes > 1:
        tensors = {k: reduce(v, reduction="sum") for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta = {
        **(metadata or {}),
        "model_type": cfg.model_type,
        "shape": {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                  "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
                  "ffn_size": tensors["neurons"].shape[-1], "num_hidden_layers": n_layers},
        "samples": samples,
        "seq_len": seq_len,
        "aggregation": {"batch": config.batch_agg, "seq": config.seq_agg},
        "config": asdict(config),
        "depth_ppl_runs": ppl_runs,
        "bi_max_run": max_run,
        "world_size": state.num_processes,
    }
    return ImportanceScores(tensors, meta)


def check_output(out: str | Path, overwrite: bool) -> None:
    if (Path(out) / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"importance scores already exist in {str(out)!r}; reuse them, or pass --overwrite")


def run_importance(model, tokenizer, data, config: ImportanceConfig, out: str | Path, metadata: dict | None = None,
                   progress: bool = True) -> StageOutput:
    """Pack calibration text, score `model`, write the scores folder whole (the CLI's `importance` and the build's).

    `data` is a `TextSource` or a path; the scores record it (and `metadata`, e.g. the model's source).
    """
    import shutil

    from accelerate import PartialState

    from .data import pack_tokens

    packed = pack_tokens(data, tokenizer, config.samples, config.seq_len, seed=config.seed)
    scores = compute_importance(model, packed.input_ids, config, {**(metadata or {}), "data": packed.source},
                                progress=progress)
    out = Path(out)
    if PartialState().is_main_process:  # initialised by compute_importance
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        scores.save(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    tokens = config.samples * config.seq_len
    return StageOutput(out, hash_folder(out) if out.exists() else None, tokens={"calibration": tokens},
                       record={"flops": forward_flops(count_parameters(model.config), tokens)})
