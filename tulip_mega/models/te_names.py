"""Parameter names of the Transformer Engine layer spec (models/specs.py) and their local-spec
equivalents: the one mapping every reader of our checkpoints uses (resume, eval and reshard in
training/checkpoint.py, `model.init_from_*` in models/init.py, export in convert/). Free of
megatron imports so that conversion can use it without megatron.

The TE spec fuses each pre-norm LayerNorm into the linear that follows it, so its LayerNorm
parameters are named after that linear. TE modules also store `_extra_state` (FP8 scaling
metadata), which megatron saves as a ShardedObject per layer: for linear_qkv, linear_proj,
linear_fc1 and linear_fc2 megatron's local linears store one too (None, and ignore it on load),
so those keys exist in both; TE 2.x's LayerNorm (the blocks' final norm) has one that local
norms lack. Loading drops a checkpoint's `_extra_state` the layers do not have, and TE layers
keep their own (fresh) one where the checkpoint has none. All other keys are the same in both.
"""

from __future__ import annotations

from typing import Iterable

# TE key suffix -> local-spec key suffix.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
EXTRA_STATE = "_extra_state"  # torch's suffix for a module's get_extra_state() entry


def canonical_key(key: str) -> str:
    """TE names -> local-spec names (the canonical key space of conversion and weight import)."""
    for te, local in TE_ALIASES.items():
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


def te_key(key: str) -> str:
    """Local-spec names -> the names TE layers store (inverse of `canonical_key`)."""
    for te, local in TE_ALIASES.items():
        if key.endswith(local):
            return key[: -len(local)] + te
    return key


def is_extra_state(key: str) -> bool:
    """A TE module's `_extra_state` (FP8 metadata), which local layers do not have."""
    return key.endswith(EXTRA_STATE)


def naming(keys: Iterable[str]) -> str:
    """'te' when the keys carry TE's fused LayerNorm names, else 'local'."""
    return "te" if any(canonical_key(key) != key for key in keys) else "local"


def checkpoint_key(key: str, available: set[str]) -> str:
    """The name under which a checkpoint holding `available` keys stores the model's `key`:
    `key` itself, its TE or local alias, or `key` unchanged when neither is there (the caller
    reports it missing)."""
    if key in available:
        return key
    for alias in (te_key(key), canonical_key(key)):
        if alias in available:
            return alias
    return key
