"""Importance scored one decoder layer at a time from a model folder's safetensors (`importance.mode: layers`), for
teachers larger than memory.

Only the config, the embeddings, one decoder layer at a time and, at the end, the final norm (and the LM head when
a perplexity pass needs logits) are loaded: the model is built on the meta device (its buffers, such as the rotary
frequencies, real), a layer's tensors are read into it with `safe_open` and dropped once every calibration batch
went through it. The model's own forward, with every layer replaced by a recorder, gives the embedding output and
the arguments each layer receives (masks, position embeddings), so nothing family-specific is re-implemented here.

Between layers every batch keeps its layer input and the last `max(bi_max_run, depth_ppl_runs)` ones (Block
Importance compares them), plus the states of the perplexity-drop passes (a run of layers skipped) and of the
head-ablation passes (a head zeroed), which run through the later layers alongside: the same layer passes as the
in-memory path, through the same hooks (`importance._layer_hooks`), so the same scores up to float summation order.
They stay in memory up to `importance.activation_memory` bytes; further batches go to a temporary folder on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .archs import get_arch, head_dim, logit_transform
from .depth import add_block_importance, nll_sum
from .heads import zero_head
from .importance import (ImportanceConfig, ImportanceScores, _channel_hook, _layer_hooks, finish_scores,
                         width_accumulators)
from .models import DTYPES, ModelSource, check_model_files, check_positions, load_config, resolve_device


def note(message: str) -> None:
    """A one-line note on stderr (a fallback the user asked not to get, a spill to disk)."""
    print(f"hf-minitron: {message}", file=sys.stderr)


def free_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def use_layers(mode: str, source) -> bool:
    """Whether `importance.mode` scores this model layer by layer: `source` a `ModelSource`; a model already loaded
    or a GGUF file is scored in memory (with a note when layers was asked)."""
    if mode not in ("auto", "memory", "layers"):
        raise ValueError(f"importance mode {mode!r} is not one of auto, memory, layers")
    if not isinstance(source, ModelSource):
        if mode == "layers":
            note("importance mode 'layers' reads a model folder one layer at a time; given a loaded model: scoring "
                 "it in memory")
        return False
    if mode == "memory":
        return False
    if source.gguf_file:
        if mode == "layers":
            note(f"importance mode 'layers' needs safetensors; {source.gguf_file} is GGUF: scoring it in memory")
        return False
    return mode == "layers" or weights_bytes(source) > free_memory() / 2


def weights_bytes(source: ModelSource) -> int:
    return sum(p.stat().st_size for p in Path(source.folder).glob("*.safetensors"))


class WeightReader:
    """The tensors of a safetensors model folder by name, read only when asked (the index, or every shard's
    header, says which file holds which tensor)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(path, framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), path))
        if not self.files:
            raise ValueError(f"model folder {str(self.folder)!r} has no safetensors weights")

    def read(self, names: dict[str, str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """{key: tensor} for {key: name in the files}, floating tensors cast to `dtype`, on `device`."""
        missing = [n for n in names.values() if n not in self.files]
        if missing:
            raise ValueError(f"model folder {str(self.folder)!r} has no tensor {missing[0]!r} in its safetensors")
        out = {}
        for path in sorted({self.files[n] for n in names.values()}):
            with safe_open(path, framework="pt") as f:
                for key, name in names.items():
                    if self.files[name] == path:
                        t = f.get_tensor(name)
                        out[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out

    def first_dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor (how transformers' dtype 'auto' reads a config without one)."""
        for name, path in self.files.items():
            with safe_open(path, framework="pt") as f:
                t = f.get_slice(name)
                dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                                        "F64": "float64"}.get(t.get_dtype(), "int64"))
            if dtype.is_floating_point:
                return dtype
        return torch.get_default_dtype()

    def load(self, module: torch.nn.Module, prefix: str, dtype: torch.dtype, device, names: dict | None = None):
        """Fill every parameter of `module` (on the meta device) with the tensor `prefix.<name>`, or `names[name]`."""
        names = names or {n: f"{prefix}.{n}" for n, _ in module.named_parameters()}
        set_parameters(module, self.read(names, dtype, device))


def set_parameters(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace `module`'s parameters by these tensors (no copy, no grad)."""
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)


def unload(module: torch.nn.Module) -> None:
    """Drop `module`'s parameters back to the meta device (frees their memory)."""
    set_parameters(module, {n: torch.empty_like(p, device="meta") for n, p in module.named_parameters()})


def weights_dtype(config, weights: WeightReader, dtype: str | None) -> torch.dtype:
    """The dtype `models.load_model` would give: the one asked for, else the config's, else the weights'."""
    if dtype:
        return DTYPES[dtype]
    own = getattr(config, "dtype", None)
    if own is not None:
        return getattr(torch, own) if isinstance(own, str) else own
    return weights.first_dtype()


def meta_model(config, dtype: torch.dtype, device="cpu"):
    """The model of `config` with its parameters on the meta device and its buffers (rotary frequencies, embedding
    scales) computed for real on `device`, tied as `from_pretrained` ties it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model.eval()


class _Stop(Exception):
    pass


def layer_calls(model, spec, batch: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The embedding output of `batch` and the (args, kwargs) the model's forward gives each decoder layer: the
    forward runs with every layer a recorder and stops at the last, so only the embeddings need weights."""
    layers = spec.decoder_layers(model)
    calls = []

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            calls.append((hidden_states, args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            del layer.forward
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


class ActivationStore:
    """Each batch's tensors between layers: in memory while they fit `budget` bytes, else one safetensors file per
    batch in a temporary folder, removed on exit."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.folder: str | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _bytes(tensors: dict) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def put(self, b: int, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.cpu() for k, v in tensors.items()}
        size = self._bytes(tensors)
        if self.used + size <= self.budget:
            self.memory[b] = tensors
            self.used += size
            return
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="hf-minitron-activations-")
            note(f"layer activations beyond activation_memory={self.budget:,} bytes go to {self.folder}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(self.folder, f"{b}.safetensors"))

    def take(self, b: int, device) -> dict[str, torch.Tensor]:
        if b in self.memory:
            tensors = self.memory.pop(b)
            self.used -= self._bytes(tensors)
        else:
            path = os.path.join(self.folder, f"{b}.safetensors")
            tensors = load_file(path)
            os.remove(path)
        return {k: v.to(device) for k, v in tensors.items()}


def _out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def compute_importance_layerwise(source: ModelSource, input_ids: torch.Tensor, config: ImportanceConfig | None = None,
                                 metadata: dict | None = None, progress: bool = True, dtype: str | None = None,
                                 device: str = "cpu") -> ImportanceScores:
    """`importance.compute_importance`'s scores of the model in `source` (a safetensors folder), reading one layer
    at a time."""
    from accelerate import PartialState

    config = config or ImportanceConfig()
    check_model_files(source)
    cfg = load_config(source)
    spec = get_arch(cfg)
    check_positions(cfg, input_ids.shape[1], "sequence length")
    weights = WeightReader(source.folder)
    wdtype = weights_dtype(cfg, weights, dtype)
    device = torch.device(resolve_device(device))
    state = PartialState(cpu=device.type == "cpu")  # cpu=True lets `accelerate launch` ranks use gloo on CPU
    if device.type == "cuda" and device.index is None:
        device = state.device  # under `accelerate launch`, this rank's GPU
    model = meta_model(cfg, wdtype, device)
    layers = spec.decoder_layers(model)
    n, heads, hd = cfg.num_hidden_layers, cfg.num_attention_heads, head_dim(cfg)
    acc = width_accumulators(model, spec, device)
    max_run = min(config.bi_max_run or max(1, n // 2), n)
    ppl_runs = sorted(set(config.depth_ppl_runs)) if config.depth_ppl_samples > 0 else []
    # each batch keeps the inputs of the last max(bi_max_run, depth_ppl_runs) layers and of the next one in a ring:
    # one allocation per batch, reused (a new tensor per layer and batch fragments the heap: +0.4 GB RSS on SmolLM2)
    slots = max([max_run, *ppl_runs]) + 1
    f64 = {"dtype": torch.float64, "device": device}
    sums = {"bi": torch.zeros(max_run, n, **f64)}
    if ppl_runs:
        sums.update(ppl_nll=torch.zeros(len(ppl_runs), n, **f64), ppl_base_nll=torch.zeros((), **f64),
                    ppl_tokens=torch.zeros((), **f64))
    if config.head_ablation_samples:
        sums.update(head_ablation_nll=torch.zeros(n, heads, **f64), head_ablation_base_nll=torch.zeros((), **f64),
                    head_ablation_tokens=torch.zeros((), **f64))

    bs = config.batch_size
    batches = list(input_ids.split(bs))
    mine = list(range(state.process_index, len(batches), state.num_processes))
    ppl_rows = {b: min(len(batches[b]), max(0, config.depth_ppl_samples - b * bs)) if ppl_runs else 0 for b in mine}
    abl_rows = {b: min(len(batches[b]), max(0, config.head_ablation_samples - b * bs)) for b in mine}
    budget = config.activation_memory if config.activation_memory is not None else free_memory() // 2
    bar = tqdm(total=n + 2, desc="importance (layers)", disable=not (progress and state.is_main_process))

    with ActivationStore(budget) as store:
        embed = model.get_submodule(spec.embed)
        weights.load(embed, spec.embed, wdtype, device)
        calls = {}  # rows -> what each layer is called with, for every batch size the passes use
        for b in mine:
            batch = batches[b].to(device)
            h0, calls[len(batch)] = layer_calls(model, spec, batch)
            for k in (ppl_rows[b], abl_rows[b]):
                if k and k not in calls:
                    calls[k] = layer_calls(model, spec, batch[:k])[1]
            ring = torch.empty(slots, *h0.shape, dtype=h0.dtype, device=h0.device)
            ring[0] = h0
            store.put(b, {"inputs": ring})
        unload(embed)
        bar.update()

        def run(j: int, x: torch.Tensor) -> torch.Tensor:
            args, kwargs = calls[len(x)][j]
            return _out(layers[j](x, *args, **kwargs))

        for j in range(n):
            weights.load(layers[j], f"{spec.layers}.{j}", wdtype, device)
            for b in mine:
                st = store.take(b, device)
                ring, kp, ka = st["inputs"], ppl_rows[b], abl_rows[b]
                h = ring[j % slots]
                for r in ppl_runs:  # layers j - r .. j - 1 skipped: layer j gets layer j - r's input
                    if kp and j - r >= 0:
                        st[f"ppl.{r}.{j - r}"] = ring[(j - r) % slots][:kp]
                for key in [k for k in st if k.startswith(("ppl.", "abl."))]:
                    st[key] = run(j, st[key])
                for head in range(heads if ka else 0):
                    with zero_head(model, j, head):
                        st[f"abl.{j}.{head}"] = run(j, h[:ka])
                handles = _layer_hooks(spec, layers[j], j, acc, hd, config.neuron_site)
                try:
                    ring[(j + 1) % slots] = run(j, h)  # over the oldest input, needed no more
                finally:
                    for handle in handles:
                        handle.remove()
                _add_block_importance(sums["bi"], [ring[d % slots] for d in range(max(0, j + 1 - max_run), j + 2)],
                                      j + 1)
                store.put(b, st)
            unload(layers[j])
            bar.update()

        norm = model.get_submodule(spec.final_norm)
        weights.load(norm, spec.final_norm, wdtype, device)
        head_module = None
        if ppl_runs or config.head_ablation_samples:
            head_module = model.get_submodule(spec.lm_head)
            tied = getattr(cfg, "tie_word_embeddings", False)
            source_name = f"{spec.embed if tied else spec.lm_head}.weight"
            weights.load(head_module, spec.lm_head, wdtype, device, {"weight": source_name})
        transform = logit_transform(cfg) or (lambda z: z)

        def nll(x: torch.Tensor, tokens: torch.Tensor, normed: bool = False) -> torch.Tensor:
            return nll_sum(transform(head_module(x if normed else norm(x))), tokens)

        final_norm_index = n * len(spec.layer_norms)
        for b in mine:
            st = store.take(b, device)
            kp, ka, tokens = ppl_rows[b], abl_rows[b], batches[b].to(device)
            for r in ppl_runs:  # the last r layers skipped: the head gets layer n - r's input
                if kp and n - r >= 0:
                    sums["ppl_nll"][ppl_runs.index(r), n - r] += nll(st["inputs"][(n - r) % slots][:kp], tokens[:kp])
            handle = norm.register_forward_hook(_channel_hook(acc, final_norm_index))
            try:
                normed = norm(st["inputs"][n % slots])
            finally:
                handle.remove()
            if kp:
                sums["ppl_base_nll"] += nll(normed[:kp], tokens[:kp], normed=True)
                sums["ppl_tokens"] += tokens[:kp, 1:].numel()
                for key in (k for k in st if k.startswith("ppl.")):
                    _, r, i = key.split(".")
                    sums["ppl_nll"][ppl_runs.index(int(r)), int(i)] += nll(st[key], tokens[:kp])
            if ka:
                sums["head_ablation_base_nll"] += nll(normed[:ka], tokens[:ka], normed=True)
                sums["head_ablation_tokens"] += tokens[:ka, 1:].numel()
                for key in (k for k in st if k.startswith("abl.")):
                    _, i, head = key.split(".")
                    sums["head_ablation_nll"][int(i), int(head)] += nll(st[key], tokens[:ka])
        bar.update()
        bar.close()

    samples, seq_len = input_ids.shape
    tensors = {"heads": acc["heads"].stats, "heads_out": acc["heads_out"].stats, "neurons": acc["neurons"].stats,
               "channels": acc["channels"].stats, **sums, "bi": sums["bi"] / (samples * seq_len)}
    return finish_scores(tensors, cfg, config, input_ids.shape, ppl_runs, max_run, state, metadata)


def _add_block_importance(bi_sum: torch.Tensor, states: list[torch.Tensor], depth: int) -> None:
    """bi_sum[run - 1, depth - run] += the Block Importance sum of (layer input depth - run, layer input depth):
    `depth.add_block_importance` over the window `states` (ending at `depth`), keeping only the pairs that end at
    the newest state (the others were added when their own end arrived)."""
    m = len(states) - 1
    window = torch.zeros(m, m, dtype=bi_sum.dtype, device=bi_sum.device)
    add_block_importance(window, states, m)
    for run in range(1, m + 1):
        bi_sum[run - 1, depth - run] += window[run - 1, m - run]
