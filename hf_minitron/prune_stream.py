"""Streaming prune (`prune.mode: stream`): the student's safetensors written from the teacher's safetensors one
tensor group at a time (the embeddings, each kept layer, the final norm with the LM head), never holding either
model whole.

Both models exist on the meta device only; for each group the teacher's tensors are read with `safe_open` into its
modules, the student's modules get empty tensors, and `prune`'s own copy functions (`_copy_embedding`,
`_copy_layer`, `_copy_head`) slice them exactly as `build_student` does. The shards are planned before any weight
is read, as `save_pretrained` plans them (same file names, same index), their headers written first, and each
tensor written at its offset as soon as it exists. The folder (config, generation config, tokenizer, pruning.json)
loads with `AutoModelForCausalLM.from_pretrained` and holds the tensors `prune.run_prune` writes in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .archs import get_arch, head_dim, num_kv_heads
from .layerwise import WeightReader, meta_model, note, set_parameters, unload, weights_dtype
from .models import ModelSource, check_model_files, load_config
from .prune import PrunePlan, _copy_embedding, _copy_head, _copy_layer
from .rundir import PRUNING_FILE

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def use_stream(mode: str, source, adapter=None) -> bool:
    """Whether `prune.mode` streams this teacher: `source` a `ModelSource` of a safetensors folder (a model already
    loaded or a GGUF file is pruned in memory, with a note when stream was asked); a search adapter is merged in
    memory (refused with stream)."""
    if mode not in ("auto", "memory", "stream"):
        raise ValueError(f"prune mode {mode!r} is not one of auto, memory, stream")
    if mode == "stream" and adapter is not None:
        raise ValueError(f"prune mode 'stream' cannot merge the search adapter {str(adapter)!r} (it needs the whole "
                         f"student in memory); set prune.mode to auto or memory")
    if not isinstance(source, ModelSource):
        if mode == "stream":
            note("prune mode 'stream' reads a teacher folder one layer at a time; given a loaded model: pruning it "
                 "in memory")
        return False
    if mode == "memory" or adapter is not None:
        return False
    if source.gguf_file:
        if mode == "stream":
            note(f"prune mode 'stream' needs safetensors; {source.gguf_file} is GGUF: pruning it in memory")
        return False
    return True


class ShardWriter:
    """The student's safetensors shards, planned from its meta-device state dict exactly as `save_pretrained` plans
    them; each file's header is written first, then every tensor at its offset when it is ready."""

    def __init__(self, out: Path, student, max_shard_size: int | str = "50GB"):
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(student.state_dict(), student)
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        self.where: dict[str, tuple[Path, int, torch.Size, torch.dtype]] = {}
        for file, names in split.filename_to_tensors.items():
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name in names:
                t = state[name]
                size = t.numel() * t.element_size()
                header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [offset, offset + size]}
                offset += size
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            path = out / file
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + offset)
            for name in names:
                self.where[name] = (path, 8 + len(raw) + header[name]["data_offsets"][0], state[name].shape,
                                    state[name].dtype)
        self.pending = set(self.where)
        self.index = None
        if split.is_sharded:
            self.index = {"metadata": {"total_parameters": student.num_parameters(), **split.metadata},
                          "weight_map": split.tensor_to_filename}
        self.out = out

    def write(self, prefix: str, module: torch.nn.Module) -> None:
        """Every planned tensor of `module` (named `prefix.<name>`): a tied copy is not planned, so not written."""
        for name, t in module.named_parameters():
            key = f"{prefix}.{name}"
            if key not in self.where:
                continue
            path, at, shape, dtype = self.where[key]
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(f"{key} is {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(memoryview(t.detach().contiguous().cpu().view(torch.uint8).numpy()))
            self.pending.discard(key)

    def close(self) -> None:
        if self.pending:
            raise ValueError(f"the streamed student lacks {sorted(self.pending)[0]!r} (and {len(self.pending) - 1} "
                             f"more tensors)")
        if self.index is not None:
            text = json.dumps(self.index, indent=2, sort_keys=True) + "\n"
            (self.out / "model.safetensors.index.json").write_text(text, encoding="utf-8")


def _empty(module: torch.nn.Module) -> None:
    """Give `module`'s meta parameters real (uninitialised) CPU memory, to be filled by a copy function."""
    set_parameters(module, {n: torch.empty(p.shape, dtype=p.dtype) for n, p in module.named_parameters()})


def _generation_config(folder: str):
    """The teacher's generation config as `from_pretrained` reads it: its file, else from config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)


@torch.no_grad()
def write_student(source: ModelSource, plan: PrunePlan, out: str | Path, tokenizer=None, info: dict | None = None,
                  dtype: str | None = None, max_shard_size: int | str = "50GB") -> None:
    """The pruned student of `plan` written to `out` from the teacher folder `source`, one group at a time:
    safetensors shards (+ index when several), config, generation config, tokenizer, pruning.json."""
    check_model_files(source)
    config = load_config(source)
    spec = get_arch(config)
    weights = WeightReader(source.folder)
    wdtype = weights_dtype(config, weights, dtype)
    teacher, student = meta_model(config, wdtype), meta_model(plan.config, wdtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, student, max_shard_size)
    tied = getattr(plan.config, "tie_word_embeddings", False)

    def group(t_modules: dict[str, str], s_modules: list[str], copy) -> None:
        """Load the teacher modules {module: tensor prefix}, copy into the student modules, write, drop them."""
        for name, prefix in t_modules.items():
            weights.load(teacher.get_submodule(name), prefix, wdtype, "cpu")
        for name in s_modules:
            _empty(student.get_submodule(name))
        copy()
        for name in s_modules:
            writer.write(name, student.get_submodule(name))
            unload(student.get_submodule(name))
        for name in t_modules:
            unload(teacher.get_submodule(name))

    group({spec.embed: spec.embed}, [spec.embed], lambda: _copy_embedding(spec, teacher, student, plan))
    t_layers, s_layers = spec.decoder_layers(teacher), spec.decoder_layers(student)
    d, heads, kv = head_dim(config), config.num_attention_heads, num_kv_heads(config)
    for i, t in enumerate(plan.layers):
        group({f"{spec.layers}.{t}": f"{spec.layers}.{t}"}, [f"{spec.layers}.{i}"],
              lambda i=i, t=t: _copy_layer(spec, t_layers[t], s_layers[i], plan, i, d, heads, kv))
    head_modules = {spec.final_norm: spec.final_norm}
    if not tied:
        head_modules[spec.lm_head] = spec.lm_head
    group(head_modules, list(head_modules), lambda: _copy_head(spec, teacher, student, plan))
    writer.close()

    student.config.dtype = str(wdtype).split(".")[1]  # what save_pretrained records
    student.config.architectures = [type(student).__name__]
    student.config.save_pretrained(out)
    if student.can_generate():
        _generation_config(source.folder).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if info is not None:
        (out / PRUNING_FILE).write_text(json.dumps(info, indent=2) + "\n")
