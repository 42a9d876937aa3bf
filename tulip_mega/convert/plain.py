"""Megatron dist checkpoint (any TP x PP) <-> plain PyTorch tensors with Hugging Face SigLIP names.

Export (`convert_checkpoint`, `tulip-mega convert CKPT --to pytorch OUT`): the torch_dist format
stores every tensor under its global (unsharded) key, so the layout that saved it does not
matter: each model tensor is read whole, one at a time, turned into plain per-layer tensors
(fused QKV split into q/k/v, TE's fused LayerNorm names mapped, `_extra_state` dropped) and
written straight into `model.safetensors`; peak host memory is one stacked tensor. Optimizer
state is never read.

Import (`plain_to_megatron`): plain-named full tensors -> our megatron key space (layers
stacked, QKV fused), what the Hugging Face and open_clip imports end with.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from tulip_mega.convert.common import ConversionError, run_config_value
from tulip_mega.convert.plain_model import CONFIG_NAME, WEIGHTS_NAME, PlainConfig
from tulip_mega.models.te_names import canonical_key, is_extra_state  # TE's names -> local-spec names

TOWERS = {"vision": "vision_model", "text": "text_model"}

# Whole-tensor renames (no layer axis).
_DIRECT = {
    "vision_embed.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "vision_embed.patch_embedding.bias": "vision_model.embeddings.patch_embedding.bias",
    "vision_embed.position_embedding": "vision_model.embeddings.position_embedding.weight",
    "vision_block.final_layernorm.weight": "vision_model.post_layernorm.weight",
    "vision_block.final_layernorm.bias": "vision_model.post_layernorm.bias",
    "text_embed.word_embeddings.weight": "text_model.embeddings.token_embedding.weight",
    "text_embed.position_embeddings.weight": "text_model.embeddings.position_embedding.weight",
    "text_block.final_layernorm.weight": "text_model.final_layer_norm.weight",
    "text_block.final_layernorm.bias": "text_model.final_layer_norm.bias",
    "text_head.weight": "text_model.head.weight",
    "text_head.bias": "text_model.head.bias",
}
_SCALARS = ("logit_scale", "logit_bias")  # megatron: shape [], plain/HF: shape [1]

# Per-layer renames, megatron sub-key (local spec; TE names: models/te_names.py) -> plain sub-key.
_LAYER = {
    "input_layernorm.weight": "layer_norm1.weight",
    "input_layernorm.bias": "layer_norm1.bias",
    "pre_mlp_layernorm.weight": "layer_norm2.weight",
    "pre_mlp_layernorm.bias": "layer_norm2.bias",
    "self_attention.linear_proj.weight": "self_attn.out_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.out_proj.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
    "mlp.linear_fc2.bias": "mlp.fc2.bias",
}
_QKV = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")


def is_model_key(key: str) -> bool:
    """Whether a checkpoint key is a SigLIP model tensor (not an optimizer, decoder or training-only one)."""
    head = key.split(".", 1)[0]
    return head in ("vision_embed", "vision_block", "vision_head", "text_embed", "text_block", "text_head") or key in _SCALARS


def training_only_modules(keys) -> list[str]:
    """The checkpoint's training-only modules (decoders, projectors, the EMA teacher, the
    self-distillation heads), named once each: what an export leaves out, and says so."""
    heads = sorted({k.split(".", 1)[0] for k in keys if not is_model_key(k) and not k.startswith("optimizer")})
    names = {"teacher": "the EMA teacher (teacher_*)"}
    out = [names["teacher"]] if any(h.startswith("teacher_") for h in heads) else []
    return out + [h for h in heads if not h.startswith("teacher_")]


def split_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's fused QKV weight or bias -> separate q, k, v. Megatron interleaves by head:
    rows are [head][q|k|v][head_dim], so a plain reshape to [3 * h, ...] would mix heads."""
    grouped = fused.reshape(num_heads, 3, fused.shape[0] // (3 * num_heads), *fused.shape[1:])
    q, k, v = (grouped[:, j].reshape(-1, *fused.shape[1:]).clone() for j in range(3))
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `split_qkv`: separate q, k, v of one layer -> megatron's head-interleaved QKV."""
    h = q.shape[0]
    fused = torch.stack([t.reshape(num_heads, h // num_heads, *t.shape[1:]) for t in (q, k, v)], dim=1)
    return fused.reshape(3 * h, *q.shape[1:])


def megatron_key_to_plain(key: str, tensor: torch.Tensor, num_heads: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain name, tensor) pairs for one full megatron tensor (layers stacked on axis 0)."""
    key = canonical_key(key)
    if is_extra_state(key):
        return
    if key in _SCALARS:
        yield key, tensor.reshape(1).clone()
        return
    if key in _DIRECT:
        yield _DIRECT[key], tensor
        return
    if key.startswith("vision_head."):
        yield "vision_model.head." + key[len("vision_head."):], tensor
        return
    for tower, plain_tower in TOWERS.items():
        prefix = f"{tower}_block.layers."
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix):]
        for i in range(tensor.shape[0]):
            base = f"{plain_tower}.encoder.layers.{i}."
            layer = tensor[i]
            if sub in _QKV:
                kind = sub.rsplit(".", 1)[1]
                for name, t in zip("qkv", split_qkv(layer, num_heads[tower])):
                    yield f"{base}self_attn.{name}_proj.{kind}", t
            elif sub in _LAYER:
                yield base + _LAYER[sub], layer.clone()
            else:
                raise ConversionError(f"unknown layer parameter {key!r}")
        return
    raise ConversionError(f"unknown model key {key!r}")


def _num_heads(config: PlainConfig) -> dict[str, int]:
    return {"vision": config.vision["num_heads"], "text": config.text["num_heads"]}


def plain_model_to_megatron(plain: dict[str, torch.Tensor], config: PlainConfig) -> dict[str, torch.Tensor]:
    """`plain_to_megatron` with the layer and head counts of a plain-model architecture."""
    return plain_to_megatron(
        plain,
        num_layers={"vision": config.vision["num_layers"], "text": config.text["num_layers"]},
        num_heads=_num_heads(config),
    )


def plain_to_megatron(plain: dict[str, torch.Tensor], num_layers: dict[str, int],
                      num_heads: dict[str, int]) -> dict[str, torch.Tensor]:
    """Full plain/HF-named tensors -> full tensors in the megatron key space (layers stacked)."""
    inverse = {v: k for k, v in _DIRECT.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in plain:
            raise ConversionError(f"missing tensor {name!r} in the source weights")
        used.add(name)
        return plain[name]

    for name, key in inverse.items():
        out[key] = take(name)
    for name in [n for n in plain if n.startswith("vision_model.head.")]:
        out["vision_head." + name[len("vision_model.head."):]] = take(name)
    for key in _SCALARS:
        out[key] = take(key).reshape(())
    inv_layer = {v: k for k, v in _LAYER.items()}
    for tower, plain_tower in TOWERS.items():
        L = num_layers[tower]
        for sub_plain, sub in inv_layer.items():
            out[f"{tower}_block.layers.{sub}"] = torch.stack(
                [take(f"{plain_tower}.encoder.layers.{i}.{sub_plain}") for i in range(L)])
        nh = num_heads[tower]
        for kind in ("weight", "bias"):
            per_layer = []
            for i in range(L):
                q, k, v = (take(f"{plain_tower}.encoder.layers.{i}.self_attn.{n}_proj.{kind}") for n in "qkv")
                per_layer.append(fuse_qkv(q, k, v, nh))
            out[f"{tower}_block.layers.self_attention.linear_qkv.{kind}"] = torch.stack(per_layer)
    extra = sorted(set(plain) - used)
    if extra:
        raise ConversionError(f"tensors with no place in the TULIP model: {extra[:10]}"
                              f"{' ...' if len(extra) > 10 else ''}")
    return out


def plain_config_from_checkpoint(path: Path, common: dict, layernorm_eps: Optional[float] = None) -> PlainConfig:
    """Architecture from the checkpoint's stored model config (+ the run's config.yaml for eps)."""
    mc = common.get("model_config") or {}
    if "vision" not in mc or "text" not in mc:
        raise ConversionError(f"{path} holds no model_config (vision/text); was it saved by tulip-mega?")
    if layernorm_eps is None:
        # Stored with the model shape; a checkpoint without it falls back to the run's config.yaml.
        layernorm_eps = mc.get("layernorm_eps")
    if layernorm_eps is None:
        layernorm_eps = _eps_from_run_config(path)
    return PlainConfig(vision=dict(mc["vision"]), text=dict(mc["text"]), layernorm_eps=layernorm_eps)


def _eps_from_run_config(path: Path) -> float:
    """model.layernorm_eps of the run's config.yaml, else the schema default (with a note)."""
    eps = run_config_value(path, "model", "layernorm_eps")
    if eps is not None:
        return float(eps)
    from tulip_mega.config.schema import ModelConfig

    eps = ModelConfig().layernorm_eps
    print(f"note: no run config.yaml beside {path}; using the default model.layernorm_eps={eps}")
    return eps


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A 1-rank gloo group for dist_checkpointing's loader when none exists (plain CLI use)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
# Per megatron key, in file order: the (plain name, shape, dtype) of each tensor it becomes.
Plan = list[tuple[str, list[tuple[str, tuple[int, ...], torch.dtype]]]]


def _plan(checkpoint: Path, meta: dict[str, Any], num_heads: dict[str, int]) -> Plan:
    """The plain tensors each model key of the checkpoint becomes: computed on meta tensors, no data read."""
    keys = sorted(k for k in meta if is_model_key(k) and not is_extra_state(k))
    if not keys:
        raise ConversionError(f"{checkpoint} holds no model tensors")
    plan = []
    for key in keys:
        shaped = torch.empty(tuple(meta[key].global_shape), dtype=meta[key].dtype, device="meta")
        plan.append((key, [(n, tuple(t.shape), t.dtype) for n, t in megatron_key_to_plain(key, shaped, num_heads)]))
    return plan


def _safetensors_header(plan: Plan, metadata: dict[str, str]) -> tuple[bytes, int]:
    """(the safetensors JSON header laying the planned tensors out in order, padded to 8 bytes; data size)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for _, outs in plan:
        for name, shape, dtype in outs:
            if dtype not in _ST_DTYPES:
                raise ConversionError(f"{name}: dtype {dtype} has no safetensors code here")
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 8), offset  # data starts 8-byte aligned


def _plain_tensors(checkpoint: Path, meta: dict[str, Any], plan: Plan, num_heads: dict[str, int], total: int,
                   log: Callable[[str], None]) -> Iterator[torch.Tensor]:
    """The planned plain tensors in order, reading one whole megatron tensor at a time and freeing
    it before the next; logs progress per megatron key."""
    from megatron.core import dist_checkpointing

    written = count = 0
    for i, (key, outs) in enumerate(plan, 1):
        full = dist_checkpointing.load({key: meta[key]}, str(checkpoint), validate_access_integrity=False).pop(key)
        for (name, shape, _), (got, t) in zip(outs, megatron_key_to_plain(key, full, num_heads)):
            assert got == name and tuple(t.shape) == shape, (got, name, t.shape, shape)
            written += t.numel() * t.element_size()
            count += 1
            yield t
            del t
        del full
        log(f"[{i}/{len(plan)}] {key}: {count} plain tensors, {written / 2**20:.1f} / {total / 2**20:.1f} MiB")


def _write_safetensors(path: Path, head: bytes, total: int, tensors: Iterator[torch.Tensor]) -> int:
    """Write `head` then each tensor's bytes to `path` (through a .partial file); returns the tensor count."""
    tmp = path.with_name(path.name + ".partial")
    written = count = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors:
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            written += t.numel() * t.element_size()
            count += 1
    if written != total:
        raise ConversionError(f"wrote {written} bytes, planned {total}")
    os.replace(tmp, path)
    return count


def convert_checkpoint(
    checkpoint: Path,
    out: Path,
    layernorm_eps: Optional[float] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write OUT/model.safetensors + OUT/config.json from a dist checkpoint; returns stats.

    Streams: the safetensors header is planned from the checkpoint metadata, then each model
    tensor is read, split into its plain tensors, written and freed, so host memory holds one
    (layer-stacked) tensor at a time, not the model.
    """
    from megatron.core import dist_checkpointing

    checkpoint, out = Path(checkpoint), Path(out)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(checkpoint)):
        raise ConversionError(f"{checkpoint} is not a dist_checkpointing checkpoint (no metadata.json)")
    t0 = time.perf_counter()
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    config = plain_config_from_checkpoint(checkpoint, common, layernorm_eps)
    num_heads = _num_heads(config)
    out.mkdir(parents=True, exist_ok=True)
    with single_process_group():
        meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
        plan = _plan(checkpoint, meta, num_heads)
        left_out = training_only_modules(meta)
        if left_out:
            log(f"left out (training-only, not part of SigLIP): {', '.join(left_out)}")
        head, total = _safetensors_header(plan, {"format": "pt", "source": str(checkpoint),
                                                 "step": str(common.get("step"))})
        tensors = _plain_tensors(checkpoint, meta, plan, num_heads, total, log)
        count = _write_safetensors(out / WEIGHTS_NAME, head, total, tensors)
    (out / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    secs = time.perf_counter() - t0
    log(f"wrote {count} tensors ({total / 2**20:.1f} MiB) to {out / WEIGHTS_NAME} in {secs:.1f}s")
    return {"tensors": count, "bytes": total, "seconds": secs, "step": common.get("step"), "config": config}
