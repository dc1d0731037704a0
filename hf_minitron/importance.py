"""Minitron importance estimation: forward passes only, activation hooks, no gradients.

Width: attention heads (norm of each head's output before the output projection), MLP neurons (activation
entering the down projection, or the paper's pre-activation with `neuron_site: pre`), embedding channels (outputs
of every hidden-size norm, summed over norms). Depth (`depth.py`): perplexity increase when a layer (or a run of
layers) is skipped, and Block Importance BI = 1 - cos(input, output) of a block or a contiguous run of blocks,
both from the layer inputs the calibration pass captures.

One calibration pass stores running sums for all nine (batch x sequence) aggregations of the paper's Table 13
grid, so any aggregation can be chosen at prune time without calibrating again. Under `accelerate launch`
batches are split across ranks and the sums all-reduced: the scores equal a single-process run. `mode: layers`
(`layerwise.py`) computes the same scores one decoder layer at a time from a safetensors folder, for teachers
larger than memory.

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
from .depth import DEPTH_METRICS, add_block_importance, nll_sum, perplexity_drop, skip_layers  # noqa: F401
from .heads import HeadScore, ablation_scores, head_ablation, output_norms
from .rundir import IMPORTANCE_FILE, StageOutput, hash_folder

SCORES_FILE, META_FILE = "importance.safetensors", IMPORTANCE_FILE


Aggregation = Literal["mean", "l2", "var"]
AGGREGATIONS = typing.get_args(Aggregation)


@dataclass
class ImportanceConfig:
    """How to calibrate: how much text, which depth metrics, which aggregation is recorded as the default."""

    samples: int = field(default=1024, metadata={"help": "calibration sequences (paper: 1024)"})
    seq_len: int = field(default=4096, metadata={"help": "tokens per calibration sequence"})
    batch_size: int = field(default=1, metadata={
        "help": "sequences per forward pass. NVIDIA reports BS > 1 costing ~1% MMLU through padding; here every "
                "window is a full packed sequence (no padding, no mask), so BS changes scores by float rounding "
                "only: SmolLM2-135M fp32 on CPU, BS 4 vs 1, width scores within 1e-15 relative (same rankings), "
                "Block Importance and perplexity drop within 4e-5 (summation order); low-precision GPU kernels "
                "may round differently per batch shape"})
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
    neuron_site: Literal["post", "pre"] = field(default="post", metadata={
        "help": "MLP-neuron activation scored (abs): post = the down projection's input, act(gate) * up (NVIDIA "
                "ModelOpt's); pre = the paper's X W1^T, the first MLP matrix's output before the activation: the "
                "gate projection of a gated MLP (its activated branch), the up projection without a gate"})
    head_ablation_samples: int = field(default=0, metadata={
        "help": "sequences for the head-ablation score (one extra pass per head and layer); 0 disables it"})
    mode: Literal["auto", "memory", "layers"] = field(default="auto", metadata={
        "help": "memory = load the whole model and run it; layers = read a safetensors model folder one decoder "
                "layer at a time (never the whole model: for teachers larger than memory), pushing every "
                "calibration sequence through each layer in turn, with the same scores; auto = layers when the "
                "model is given as a safetensors folder whose weights exceed half the free memory, else memory. "
                "A GGUF teacher (or a model a caller already loaded) is scored in memory, with a note"})
    activation_memory: int | None = field(default=None, metadata={
        "help": "bytes of calibration activations mode layers keeps in memory between layers (e.g. 8G): each "
                "batch's layer input, the last max(bi_max_run, depth_ppl_runs) layer inputs for Block Importance "
                "and the skip passes, and the perplexity-drop and head-ablation passes' states; batches beyond it "
                "go to a temporary folder on disk (TMPDIR) (none: half the free memory when the pass starts)"})


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
        v = values.to(self.stats.device, torch.float64)  # a dispatched model's layers sit on different devices
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

    def heads(self, batch_agg=None, seq_agg=None, score: str = "input") -> torch.Tensor:
        """[layers, heads] by one of the head scores of `heads.py` (ablation ignores the aggregation)."""
        key = {"input": "heads", "output": "heads_out", "ablation": "head_ablation_nll"}.get(score)
        if key is None:
            raise ValueError(f"unknown head score {score!r}; choose from {', '.join(typing.get_args(HeadScore))}")
        if key not in self.tensors:
            hint = "--head-ablation-samples N" if score == "ablation" else "a newer hf-minitron"
            raise ValueError(f"these importance scores have no {score!r} head score; re-run importance with {hint}")
        if score == "ablation":
            return ablation_scores(self.tensors)
        return self._agg(key, batch_agg, seq_agg)

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
        """Single-layer importance by a depth metric (ppl, bi; a -run metric gives its 1-layer scores)."""
        if metric in ("ppl", "ppl-run"):
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


def _w1(spec, layer) -> tuple[torch.nn.Module, bool]:
    """The paper's W1 (whose output enters the activation): gate, else up; True when fused [gate; up] rows."""
    mlp = spec.mlp_module(layer)
    return mlp.get_submodule(spec.gate_up_proj or spec.gate_proj or spec.up_proj), spec.gate_up_proj is not None


def _channel_hook(acc: dict, j: int):
    """Forward hook of the j-th hidden-size norm (the final norm is the last): |output| channel statistics."""
    def hook(_module, _args, output):
        acc["channels"].add(_moments(output.abs()), j)
    return hook


def _layer_hooks(spec, layer, i: int, acc: dict, hd: int, neuron_site: str = "post") -> list:
    """Register decoder layer i's width hooks (heads, neurons, its norms' channels); returns the handles. The
    layer-by-layer path (`layerwise.py`) hooks one layer at a time with these."""
    def head_hook(o_proj, args, kwargs=None):
        x = args[0]
        a = x.view(*x.shape[:-1], -1, hd).float().norm(dim=-1)  # [B, S, heads]
        acc["heads"].add(_moments(a), i)
        acc["heads_out"].add(_moments(output_norms(x, o_proj, hd)), i)

    def neuron_hook(_module, args):
        acc["neurons"].add(_moments(args[0].abs()), i)

    def pre_neuron_hook(fused):
        def hook(_module, _args, output):
            gate = output[..., : output.shape[-1] // 2] if fused else output
            acc["neurons"].add(_moments(gate.abs()), i)
        return hook

    handles = [spec.out_proj(layer).register_forward_pre_hook(head_hook)]
    if neuron_site == "pre":
        w1, fused = _w1(spec, layer)
        handles.append(w1.register_forward_hook(pre_neuron_hook(fused)))
    else:
        handles.append(spec.down(layer).register_forward_pre_hook(neuron_hook))
    first = i * len(spec.layer_norms)
    for k, norm in enumerate(spec.norms(layer)):
        handles.append(norm.register_forward_hook(_channel_hook(acc, first + k)))
    return handles


@contextmanager
def _hooks(model, spec, acc: dict, hidden_states: list | None, neuron_site: str = "post"):
    """Register the width hooks (and, when `hidden_states` is a list, the layer-input capture for BI and the
    perplexity-drop pass)."""
    hd = head_dim(model.config)
    handles = []
    layers = spec.decoder_layers(model)

    def capture(_module, args, kwargs):
        hidden_states.append(args[0] if args else kwargs["hidden_states"])

    def capture_last(_module, _args, _kwargs, output):
        hidden_states.append(output[0] if isinstance(output, tuple) else output)

    for i, layer in enumerate(layers):
        handles += _layer_hooks(spec, layer, i, acc, hd, neuron_site)
        if hidden_states is not None:
            handles.append(layer.register_forward_pre_hook(capture, with_kwargs=True))
    final = model.get_submodule(spec.final_norm)
    handles.append(final.register_forward_hook(_channel_hook(acc, len(layers) * len(spec.layer_norms))))
    if hidden_states is not None:
        handles.append(layers[-1].register_forward_hook(capture_last, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def width_accumulators(model, spec, device=None) -> dict:
    """Empty running statistics for every width unit the hooks of `_hooks` fill, on `device` (default: the
    model's)."""
    cfg, device = model.config, device or next(model.parameters()).device
    n_layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    return {"heads": _Accumulator(n_layers, heads, device=device),
            "heads_out": _Accumulator(n_layers, heads, device=device),
            "neurons": _Accumulator(n_layers, spec.down(spec.decoder_layers(model)[0]).in_features, device=device),
            "channels": _Accumulator(n_layers * len(spec.layer_norms) + 1, cfg.hidden_size, device=device)}


@torch.no_grad()  # forward passes only: without it every hook's running sum would chain the batches' graphs
def compute_importance(model, input_ids: torch.Tensor, config: ImportanceConfig | None = None,
                       metadata: dict | None = None, progress: bool = True) -> ImportanceScores:
    """Score every width and depth unit of `model` on calibration sequences `input_ids` [samples, seq_len]."""
    from accelerate import PartialState

    config = config or ImportanceConfig()
    spec = get_arch(model.config)
    cfg = model.config
    device = next(model.parameters()).device
    state = PartialState(cpu=device.type == "cpu")  # cpu=True lets `accelerate launch` ranks use gloo on CPU
    n_layers = cfg.num_hidden_layers
    acc = width_accumulators(model, spec)
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
        with _hooks(model, spec, acc, states, config.neuron_site):
            logits = model(input_ids=batch, use_cache=False).logits
        k = max(0, config.depth_ppl_samples - b * config.batch_size) if ppl_runs else 0
        if k:  # the perplexity-drop pass: the full model's NLL is this pass's, each skip resumes from `states`
            ppl_base += nll_sum(logits[:k], batch[:k]).to(device)
            ppl_tokens += batch[:k, 1:].numel()
        del logits
        add_block_importance(bi_sum, states, max_run)
        if k:
            ppl_nll += perplexity_drop(model, batch[:k], states[:n_layers], ppl_runs)
        del states

    head_tensors = {}
    if config.head_ablation_samples:
        chunks = list(input_ids[: config.head_ablation_samples].split(config.batch_size))
        head_tensors = head_ablation(model, chunks[state.process_index::state.num_processes],
                                     progress and state.is_main_process)
    tensors = {"heads": acc["heads"].stats, "heads_out": acc["heads_out"].stats, "neurons": acc["neurons"].stats,
               "channels": acc["channels"].stats, "bi": bi_sum / (samples * seq_len), **head_tensors}
    if ppl_runs:
        tensors.update(ppl_nll=ppl_nll, ppl_base_nll=ppl_base, ppl_tokens=ppl_tokens)
    return finish_scores(tensors, cfg, config, input_ids.shape, ppl_runs, max_run, state, metadata)


def finish_scores(tensors: dict, cfg, config: ImportanceConfig, shape, ppl_runs: list[int], max_run: int, state,
                  metadata: dict | None) -> ImportanceScores:
    """This rank's sums all-reduced across ranks, on the CPU, with the metadata every scores folder records (shared
    by the in-memory and the layer-by-layer pass)."""
    from accelerate.utils import reduce

    samples, seq_len = shape
    if state.num_processes > 1:
        tensors = {k: reduce(v, reduction="sum") for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta = {
        **(metadata or {}),
        "model_type": cfg.model_type,
        "shape": {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                  "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
                  "ffn_size": tensors["neurons"].shape[-1], "num_hidden_layers": cfg.num_hidden_layers},
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
                   progress: bool = True, dtype: str | None = None, device: str = "cpu") -> StageOutput:
    """Pack calibration text, score the model, write the scores folder whole (the CLI's `importance` and the build's).

    `model`: a loaded model, or a `ModelSource` (`models.resolve_source`): loaded here in `dtype` on `device`, or,
    with `config.mode` layers (or auto, for a folder larger than half the free memory), read one layer at a time
    (`layerwise.py`). `data` is a `TextSource` or a path; the scores record it (and `metadata`, e.g. the model's
    source).
    """
    import shutil

    from accelerate import PartialState

    from .data import pack_tokens
    from .layerwise import compute_importance_layerwise, use_layers
    from .models import check_positions, load_config, load_model

    packed = pack_tokens(data, tokenizer, config.samples, config.seq_len, seed=config.seed)
    metadata = {**(metadata or {}), "data": packed.source}
    if use_layers(config.mode, model):
        scores = compute_importance_layerwise(model, packed.input_ids, config, metadata, progress, dtype, device)
        model_config = load_config(model)
    else:
        if not isinstance(model, torch.nn.Module):
            model = load_model(model, dtype=dtype, device=device)
            check_positions(model.config, config.seq_len, "sequence length")
        scores = compute_importance(model, packed.input_ids, config, metadata, progress=progress)
        model_config = model.config
    out = Path(out)
    if PartialState().is_main_process:  # initialised by compute_importance
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        scores.save(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    tokens = config.samples * config.seq_len
    return StageOutput(out, hash_folder(out) if out.exists() else None, tokens={"calibration": tokens},
                       record={"flops": forward_flops(count_parameters(model_config), tokens)})
