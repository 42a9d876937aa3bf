"""Layout-invariant parameter initialisation.

Every parameter is drawn as its *full, unsharded* tensor from a generator seeded by the run
seed and the parameter's global checkpoint key (plus its global layer index), and each rank
keeps only its own slice. The layout comes from megatron's `sharded_state_dict()`, which
knows each local tensor's global shape and offset under any TP/PP. So a TP=2 x PP=2 model
starts from exactly the weights of the TP=1 x PP=1 model with the same seed: runs are
reproducible across layouts, and layout-equivalence tests need no weight copying.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from tulip_mega.models.te_names import canonical_key

# Output projections of residual branches get a std scaled by 1/sqrt(2 * num_layers) (GPT-2).
_RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")
# Keys the model initialises itself from recipe constants (logit scale/bias).
_SKIP = ("logit_scale", "logit_bias", "_center")  # the teacher-output centres start at zero (DINO)


def _generator(seed: int, key: str, layer_index: tuple[int, ...]) -> torch.Generator:
    tag = f"{seed}|{key}|{','.join(map(str, layer_index))}".encode()
    return torch.Generator().manual_seed(zlib.crc32(tag) + (seed << 32))


def _full_init(key: str, shape: tuple[int, ...], gen: torch.Generator, std: float, num_layers: int) -> torch.Tensor:
    if key.endswith("bias") or key.endswith("_bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and key.endswith("weight"):
        return torch.ones(shape)  # LayerNorm gains (the only 1-D weights in the model)
    if key.endswith(_RESIDUAL_OUTPUTS):
        std = std / math.sqrt(2.0 * max(num_layers, 1))
    return torch.randn(shape, generator=gen) * std


def initialize_parameters(model: torch.nn.Module, seed: int, std: float, num_layers: dict[str, int]) -> int:
    """Fill every parameter of `model` (one pipeline stage) layout-invariantly.

    `num_layers` maps a key prefix ('vision_block', 'text_block') to that tower's total layer
    count (for the residual-output scaling). Returns the number of tensors initialised and
    raises if a parameter was not reached (a new module whose state the sharded state dict
    misses would otherwise silently keep uninitialised memory).
    """
    sharded = extract_sharded_tensors(model.sharded_state_dict())[0]
    done: set[int] = set()
    count = 0
    with torch.no_grad():
        for sh in _iter_sharded(sharded):
            if sh.key.endswith(_SKIP):
                done.add(sh.data.data_ptr())
                continue
            p = sh.prepend_axis_num
            layer_index = tuple(sh.global_offset[:p])
            full_shape = tuple(sh.global_shape[p:])
            offsets = sh.global_offset[p:]
            tower_layers = next((n for pre, n in num_layers.items() if pre in sh.key), 1)
            full = _full_init(sh.key, full_shape, _generator(seed, sh.key, layer_index), std, tower_layers)
            local = full[tuple(slice(o, o + n) for o, n in zip(offsets, sh.local_shape))]
            sh.data.copy_(local.reshape(sh.data.shape))
            done.add(sh.data.data_ptr())
            count += 1
    _check_covered(model, done, "left uninitialised")
    return count


def mark_tensor_parallel(model: torch.nn.Module) -> int:
    """Give every tensor-parallel shard megatron's TP attributes (``tensor_model_parallel``,
    ``partition_dim``, ``partition_stride``); returns how many were marked.

    Why: megatron-core's parallel layers set these only inside their own weight initialisers,
    which ``perform_initialization=False`` (we initialise layout-invariantly above) skips, so
    the weights of ColumnParallelLinear, RowParallelLinear and VocabParallelEmbedding came out
    unmarked. megatron's optimizer counts an unmarked parameter as a TP replica and adds its
    gradient to the global norm on TP rank 0 only, so the logged grad_norm, and the clipping
    that divides by it, dropped every other TP rank's shards (tiny_cpu step 1: 61.1 at TP=2
    vs 74.5 at TP=1 for the same gradients). The split is read from the sharded state dict,
    where a local shape smaller than the global one (past the layer axes) is the TP split; this
    holds for the local and the Transformer Engine spec alike.
    """
    params = {p.data_ptr(): p for p in model.parameters()}
    marked = 0
    for sh in _iter_sharded(extract_sharded_tensors(model.sharded_state_dict())[0]):
        param = params.get(sh.data.data_ptr())
        if param is None:
            continue
        global_shape = tuple(sh.global_shape[sh.prepend_axis_num:])
        split = [d for d, (g, n) in enumerate(zip(global_shape, sh.local_shape)) if g != n]
        if not split:
            continue  # replicated over TP: megatron's rule (count it on TP rank 0) is right
        if len(split) > 1:
            raise RuntimeError(f"{sh.key}: local shape {tuple(sh.local_shape)} differs from the global "
                               f"{global_shape} on more than one axis; a TP shard is split along one")
        if not hasattr(param, "tensor_model_parallel"):  # megatron marked its ColumnParallel biases itself
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=split[0], stride=1)
            marked += 1
    return marked


def _check_covered(model: torch.nn.Module, done: set[int], what: str) -> None:
    """Every parameter must have been reached through the sharded state dict: a module whose
    state it misses would otherwise silently keep whatever memory it had."""
    missing = [n for n, prm in model.named_parameters() if prm.data_ptr() not in done]
    if missing:
        raise RuntimeError(f"parameters not covered by the sharded state dict, {what}: {missing}")


def _iter_sharded(tree) -> Iterable[ShardedTensor]:
    if isinstance(tree, ShardedTensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _iter_sharded(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _iter_sharded(v)


def load_full_tensors(model: torch.nn.Module, full: dict[str, torch.Tensor], optional: tuple[str, ...] = ()) -> int:
    """Copy this rank's slice of full (unsharded) tensors into `model` (one pipeline stage).

    `full` is keyed like a dist checkpoint (what `load_plain_tensors` returns): one key per
    parameter kind with the layers stacked on axis 0. Transformer Engine's fused LayerNorm
    names and the local spec's names are interchangeable. Raises naming the key when a tensor
    is missing or its shape differs, except keys starting with one of `optional` (modules the
    source cannot have, e.g. the training-only decoders), which keep their values. Returns the
    number of tensors copied.
    """
    by_canonical = {canonical_key(k): v for k, v in full.items()}
    sharded = extract_sharded_tensors(model.sharded_state_dict())[0]
    done: set[int] = set()
    count = 0
    with torch.no_grad():
        for sh in _iter_sharded(sharded):
            src = full.get(sh.key)
            if src is None:
                src = by_canonical.get(canonical_key(sh.key))
            if src is None and sh.key.startswith(optional):
                done.add(sh.data.data_ptr())  # training-only module the source lacks: keeps its init
                continue
            if src is None:
                raise KeyError(f"model.init_from_hf / init_from_open_clip: no tensor for model key {sh.key!r} "
                               f"(global shape {tuple(sh.global_shape)})")
            if tuple(src.shape) != tuple(sh.global_shape):
                raise ValueError(f"model.init_from_hf / init_from_open_clip: {sh.key!r} has shape {tuple(src.shape)} "
                                 "in the source but the model "
                                 f"expects {tuple(sh.global_shape)}")
            index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, (1,) * sh.prepend_axis_num + tuple(sh.local_shape)))
            local = src[index].reshape(sh.data.shape)
            sh.data.copy_(local.to(sh.data.dtype))
            done.add(sh.data.data_ptr())
            count += 1
    _check_covered(model, done, "not loaded")
    return count
