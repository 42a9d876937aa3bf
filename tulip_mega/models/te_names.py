"""Parameter names of the Transformer Engine layer spec (models/specs.py) and their local-spec
equivalents, kept beside the spec decision and free of megatron imports so that conversion
(tulip_mega/convert) can use them without megatron.

The TE spec fuses each pre-norm LayerNorm into the linear that follows it, so its LayerNorm
parameters are named after that linear. The local-spec names are the canonical key space that
checkpoint conversion and weight loading work in.
"""

from __future__ import annotations

# TE key suffix -> local-spec key suffix.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_key(key: str) -> str:
    """TE names -> local-spec names (the canonical megatron key space)."""
    for te, local in TE_ALIASES.items():
        if key.endswith(te):
            return key[: -len(te)] + local
    return key
