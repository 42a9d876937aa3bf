"""Megatron dist checkpoint (any TP x PP) -> plain PyTorch `model.safetensors` + `config.json`.

The torch_dist format stores every tensor under its global (unsharded) key, so the layout
that saved it does not matter here: each model tensor is read whole, one at a time, turned
into plain per-layer tensors (fused QKV split into q/k/v, TE's fused LayerNorm names mapped,
`_extra_state` dropped) and the stacked original freed; peak host memory is the output plus
one stacked tensor. Optimizer state is never read.

The key mapping lives in `megatron_key_to_plain` / `plain_to_megatron` (both megatron-free)
so the Hugging Face import (`tulip_mega.convert.hf`) reuses it in reverse.
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
from typing import Callable, Iterator, Optional

import torch

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


class ConversionError(RuntimeError):
    """A checkpoint or model that cannot be converted; the message says why."""


def is_model_key(key: str) -> bool:
    head = key.split(".", 1)[0]
    return head in ("vision_embed", "vision_block", "vision_head", "text_embed", "text_block", "text_head") or key in _SCALARS


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
                nh = num_heads[tower]
                kind = sub.rsplit(".", 1)[1]
                grouped = layer.reshape(nh, 3, layer.shape[0] // (3 * nh), *layer.shape[1:])
                for j, name in enumerate("qkv"):
                    yield f"{base}self_attn.{name}_proj.{kind}", grouped[:, j].reshape(-1, *layer.shape[1:]).clone()
            elif sub in _LAYER:
                yield base + _LAYER[sub], layer.clone()
            else:
                raise ConversionError(f"unknown layer parameter {key!r}")
        return
    raise ConversionError(f"unknown model key {key!r}")


def plain_model_to_megatron(plain: dict[str, torch.Tensor], config: PlainConfig) -> dict[str, torch.Tensor]:
    """`plain_to_megatron` with the layer and head counts of a plain-model architecture."""
    return plain_to_megatron(
        plain,
        num_layers={"vision": config.vision["num_layers"], "text": config.text["num_layers"]},
        num_heads={"vision": config.vision["num_heads"], "text": config.text["num_heads"]},
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
                h = q.shape[0]
                fused = torch.stack([t.reshape(nh, h // nh, *t.shape[1:]) for t in (q, k, v)], dim=1)
                per_layer.append(fused.reshape(3 * h, *q.shape[1:]))
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
        # Checkpoints store it with the model shape; older ones only in the run's config.yaml.
        layernorm_eps = mc.get("layernorm_eps")
    if layernorm_eps is None:
        layernorm_eps = _eps_from_run_config(path)
    return PlainConfig(vision=dict(mc["vision"]), text=dict(mc["text"]), layernorm_eps=layernorm_eps)


def _eps_from_run_config(path: Path) -> float:
    run_cfg = Path(path).resolve().parent.parent / "config.yaml"
    if run_cfg.is_file():
        import yaml

        eps = ((yaml.safe_load(run_cfg.read_text()) or {}).get("model") or {}).get("layernorm_eps")
        if eps is not None:
            return float(eps)
    from tulip_mega.config.schema import ModelConfig

    eps = ModelConfig().layernorm_eps
    print(f"note: no run config.yaml beside {path}; using the default model.layernorm_eps={eps}")
    return eps


@contextlib.contextmanager
def single_process_group():
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


def _plan(keys_meta: list[tuple[str, torch.Tensor]], num_heads: dict[str, int]) -> list[tuple[str, list]]:
    """Per megatron key, the (plain name, shape, dtype) it becomes: computed on meta tensors, no data."""
    plan = []
    for key, meta in keys_meta:
        outs = [(n, tuple(t.shape), t.dtype) for n, t in megatron_key_to_plain(key, meta, num_heads)]
        plan.append((key, outs))
    return plan


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
    num_heads = {"vision": config.vision["num_heads"], "text": config.text["num_heads"]}
    out.mkdir(parents=True, exist_ok=True)
    with single_process_group():
        meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
        keys = sorted(k for k in meta if is_model_key(k) and not is_extra_state(k))
        if not keys:
            raise ConversionError(f"{checkpoint} holds no model tensors")
        plan = _plan([(k, torch.empty(tuple(meta[k].global_shape), dtype=meta[k].dtype, device="meta"))
                      for k in keys], num_heads)
        header: dict = {"__metadata__": {"format": "pt", "source": str(checkpoint), "step": str(common.get("step"))}}
        offset = 0
        for _, outs in plan:
            for name, shape, dtype in outs:
                if dtype not in _ST_DTYPES:
                    raise ConversionError(f"{name}: dtype {dtype} has no safetensors code here")
                n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
        total = offset
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
        written = count = 0
        tmp = out / (WEIGHTS_NAME + ".partial")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for i, (key, outs) in enumerate(plan, 1):
                loaded = dist_checkpointing.load({key: meta[key]}, str(checkpoint), validate_access_integrity=False)
                full = loaded.pop(key)
                for (name, shape, _), (got, t) in zip(outs, megatron_key_to_plain(key, full, num_heads)):
                    assert got == name and tuple(t.shape) == shape, (got, name, t.shape, shape)
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    written += t.numel() * t.element_size()
                    count += 1
                    del t
                del full, loaded
                log(f"[{i}/{len(plan)}] {key}: {count} plain tensors, {written / 2**20:.1f} / {total / 2**20:.1f} MiB")
        if written != total:
            raise ConversionError(f"wrote {written} bytes, planned {total}")
        os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    secs = time.perf_counter() - t0
    log(f"wrote {count} tensors ({total / 2**20:.1f} MiB) to {out / WEIGHTS_NAME} in {secs:.1f}s")
    return {"tensors": count, "bytes": total, "seconds": secs, "step": common.get("step"), "config": config}
