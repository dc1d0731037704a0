"""Every per-architecture fact in one place.

Stages ask `get_arch(config)` for an `ArchSpec` and work through its names; they never branch on `model_type`.
To add a family, add one `ArchSpec` to `specs.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its weights, which quirks it has, and how biases follow its config."""

    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q_proj: str | None = "q_proj"
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    qkv_proj: str | None = None  # fused [q; k; v] rows (Phi-3)
    o_proj: str = "o_proj"
    head_norms: tuple[str, ...] = ()  # per-head-dim norms (q_norm/k_norm): untouched by width pruning
    mlp: str = "mlp"
    gate_proj: str | None = "gate_proj"  # None: no gate (Nemotron's squared-ReLU MLP)
    up_proj: str | None = "up_proj"
    gate_up_proj: str | None = None  # fused [gate; up] rows (Phi-3)
    down_proj: str = "down_proj"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    mlp_input_norm: str = "post_attention_layernorm"  # the norm whose input is the pre-MLP residual stream
    norm_has_bias: bool = False  # LayerNorm1P (Nemotron)
    scaled_embedding: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
    logit_softcap: str | None = None  # config attribute of the final-logit soft cap, cap * tanh(z / cap) (Gemma)
    # bias rules: a config attribute name, or a constant True/False
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    mlp_bias: str | bool = False
    intermediate_key: str = "intermediate_size"
    hidden_divisible_by_heads: bool = False  # the config class refuses hidden_size % num_attention_heads != 0

    def has_bias(self, rule: str | bool, config) -> bool:
        return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule

    # --- module access -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp)

    def down(self, layer: nn.Module) -> nn.Linear:
        return self.mlp_module(layer).get_submodule(self.down_proj)

    def out_proj(self, layer: nn.Module) -> nn.Linear:
        return self.attention(layer).get_submodule(self.o_proj)

    def norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.get_submodule(n) for n in self.layer_norms]

    def mlp_input(self, layer: nn.Module) -> nn.Module:
        """The module whose input is the residual stream entering the MLP (hook it to read that stream)."""
        return layer.get_submodule(self.mlp_input_norm)

    def layer_axes(self) -> dict[str, tuple[str | None, str | None]]:
        """For each module in a decoder layer: which pruning axis its weight's rows and columns follow.

        Axes: hidden (embedding channels), q (query-head rows), kv (key/value-head rows), qkv (fused [q; k; v]),
        ffn (MLP neurons), ffn2 (fused [gate; up]); None = kept whole. Biases and norm weights follow the rows.
        """
        a, m = self.attn, self.mlp
        axes: dict[str, tuple[str | None, str | None]] = {}
        if self.qkv_proj:
            axes[f"{a}.{self.qkv_proj}"] = ("qkv", "hidden")
        else:
            axes[f"{a}.{self.q_proj}"] = ("q", "hidden")
            axes[f"{a}.{self.k_proj}"] = ("kv", "hidden")
            axes[f"{a}.{self.v_proj}"] = ("kv", "hidden")
        axes[f"{a}.{self.o_proj}"] = ("hidden", "q")
        for name in self.head_norms:
            axes[f"{a}.{name}"] = (None, None)
        if self.gate_up_proj:
            axes[f"{m}.{self.gate_up_proj}"] = ("ffn2", "hidden")
        else:
            for name in (self.gate_proj, self.up_proj):
                if name:
                    axes[f"{m}.{name}"] = ("ffn", "hidden")
        axes[f"{m}.{self.down_proj}"] = ("hidden", "ffn")
        for name in self.layer_norms:
            axes[name] = ("hidden", None)
        return axes

    def query_weight_names(self) -> list[str]:
        """Modules whose leading rows are the query heads (merged in head pruning)."""
        return [f"{self.attn}.{self.qkv_proj or self.q_proj}"]

    def kv_weight_names(self) -> list[str]:
        if self.qkv_proj:
            return []
        return [f"{self.attn}.{self.k_proj}", f"{self.attn}.{self.v_proj}"]


class UnsupportedArchitectureError(ValueError):
    pass


def supported_model_types() -> list[str]:
    from .specs import FAMILIES

    return sorted(t for spec in FAMILIES for t in spec.model_types)


def get_arch(config) -> ArchSpec:
    """The spec for a config's `model_type`; a one-line error listing the supported ones otherwise."""
    from .specs import FAMILIES

    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}"
    )


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the family's `forward` does to `lm_head`'s output before returning `.logits` (Gemma's soft cap), or
    None. Losses that apply the LM head themselves must apply this too, to compare the distributions the models
    really output."""
    spec = get_arch(config)
    cap = getattr(config, spec.logit_softcap, None) if spec.logit_softcap else None
    if not cap:
        return None
    return lambda z: torch.tanh(z / cap) * cap


def head_dim(config) -> int:
    """transformers falls back to hidden/heads when `head_dim` is absent or None; so do we."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def intermediate_size(config, spec: ArchSpec | None = None) -> int:
    spec = spec or get_arch(config)
    return getattr(config, spec.intermediate_key)


def count_parameters(config) -> int:
    """Exact parameter count of a model built from `config`, without building it (search calls this often)."""
    spec = get_arch(config)
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads, kv, hd = config.num_attention_heads, num_kv_heads(config), head_dim(config)
    ffn = intermediate_size(config, spec)
    norm = hidden * (2 if spec.norm_has_bias else 1)

    qkv_out = (heads + 2 * kv) * hd
    attn = hidden * qkv_out + heads * hd * hidden
    attn += qkv_out * spec.has_bias(spec.qkv_bias, config) + hidden * spec.has_bias(spec.o_bias, config)
    attn += hd * len(spec.head_norms)
    up_mats = 2 if (spec.gate_proj or spec.gate_up_proj) else 1
    mlp = up_mats * hidden * ffn + ffn * hidden
    mlp += (up_mats * ffn + hidden) * spec.has_bias(spec.mlp_bias, config)
    per_layer = attn + mlp + norm * len(spec.layer_norms)

    embed = vocab * hidden
    head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden
    return embed + head + norm + layers * per_layer
