"""The supported families as data: one `ArchSpec` each (module names, fused projections, biases, norms, scaling)."""

from . import ArchSpec

LLAMA = ArchSpec(model_types=("llama",), qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
                 hidden_divisible_by_heads=True)
MISTRAL = ArchSpec(model_types=("mistral",))
QWEN2 = ArchSpec(model_types=("qwen2",), qkv_bias=True)
QWEN3 = ArchSpec(
    model_types=("qwen3",), head_norms=("q_norm", "k_norm"), qkv_bias="attention_bias", o_bias="attention_bias"
)
# Nemotron: squared-ReLU MLP without a gate, LayerNorm1P (weight + 1, with bias), partial rotary (head_dim untouched).
NEMOTRON = ArchSpec(
    model_types=("nemotron",),
    gate_proj=None,
    norm_has_bias=True,
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    mlp_bias="mlp_bias",
)
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
# Gemma 2/3: sqrt(hidden) embedding scale, (1 + w) RMSNorms, pre/post feed-forward norms, sliding-window layer_types,
# final-logit soft-capping (Gemma 2: 30 by default; Gemma 3: off unless the config sets it). post_attention_layernorm
# normalises the attention output before the residual add: the MLP's residual input enters pre_feedforward_layernorm.
GEMMA2 = ArchSpec(
    model_types=("gemma2",),
    layer_norms=_GEMMA_NORMS,
    mlp_input_norm="pre_feedforward_layernorm",
    logit_softcap="final_logit_softcapping",
    scaled_embedding=True,
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    hidden_divisible_by_heads=True,
)
GEMMA3 = ArchSpec(
    model_types=("gemma3_text",),
    layer_norms=_GEMMA_NORMS,
    mlp_input_norm="pre_feedforward_layernorm",
    logit_softcap="final_logit_softcapping",
    head_norms=("q_norm", "k_norm"),
    scaled_embedding=True,
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    hidden_divisible_by_heads=True,
)
# Phi-3: fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows).
PHI3 = ArchSpec(
    model_types=("phi3",),
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="qkv_proj",
    gate_proj=None,
    up_proj=None,
    gate_up_proj="gate_up_proj",
)

FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, NEMOTRON, GEMMA2, GEMMA3, PHI3)
