"""open_clip export and import: the format the TULIP authors released their models in.

Export (`tulip-mega convert CKPT --to open_clip OUT`) writes OUT in open_clip's hub layout,
which stock `open_clip` loads offline with `create_model_and_transforms("local-dir:OUT")`
and `get_tokenizer("local-dir:OUT")`:

- `open_clip_model.safetensors`: a `CustomTextCLIP` state dict (timm vision trunk, open_clip
  `TextTransformer`);
- `open_clip_config.json`: `{"model_cfg": ..., "preprocess_cfg": ...}`, the model config in the
  layout of the TULIP release configs (timm SigLIP vision tower with MAP pool and no
  projection; open_clip text tower with last-token pool, no causal mask, projection bias,
  tanh-GELU, our LayerNorm epsilon), plus our architecture under "tulip_plain";
- the run's SentencePiece model as a Hugging Face tokenizer folder (the same SiglipTokenizer
  files as the HF export), which open_clip's `HFTokenizer` loads from OUT itself.

Import (`import_open_clip(dir)`): such a folder (or a TULIP release folder) -> full tensors in
our megatron key space, what `model.init_from_open_clip` loads into any TP x PP.

The vision tower is named, not described: open_clip builds it with `timm.create_model(name)`
(open_clip 3.3 passes no architecture arguments to timm). Our b16 / so400m / g16 sizes are
timm's SigLIP models, named as in the TULIP release configs. The debug size has no timm model:
its export names `local-dir:<OUT>/timm_vision` instead, a timm config folder (`config.json`:
a registered SigLIP ViT as `architecture` plus the debug size's `model_args`, tanh-GELU) that
timm's own `local-dir:` loader builds, so stock open_clip + timm load it in a process that never
imports this project. The path is absolute (timm resolves `local-dir:` against the working
directory): a moved debug export needs the name edited. Importing this module also registers
`DEBUG_TIMM_NAME` in timm, for exports written before the timm folder existed.

Numerics: ours, HF SigLIP, big_vision and timm's g/16 use tanh-GELU everywhere; timm's
`vit_base_patch16_siglip_224` and `vit_so400m_patch14_siglip_384` use erf-GELU in the vision
MLPs, so b16 / so400m exports differ from our embeddings by that approximation (the two GELUs
differ by at most 4.7e-4 per activation; at b16 with random init-scale weights the unit
embeddings moved by 3e-5, more with trained weights); debug and g16 exports match to rounding.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from tulip_mega.convert.common import ConversionError, check_matches_recipe, run_config_value, run_tokenizer
from tulip_mega.convert.hf import write_processor
from tulip_mega.convert.plain import convert_checkpoint, plain_model_to_megatron
from tulip_mega.convert.plain_model import WEIGHTS_NAME, PlainConfig

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
DEBUG_TIMM_NAME = "vit_tulip_debug_patch8_siglip_32"

# Our vision architecture (image_size, patch_size, num_layers, hidden_size, num_heads, ffn_hidden_size)
# -> (timm model name, open_clip vision_cfg.image_size). so400m: see config/sizes.py (378 = 27 x 14
# is what timm's "384" model sees too).
TIMM_VISION = {
    (32, 8, 2, 64, 4, 256): (DEBUG_TIMM_NAME, 32),
    (224, 16, 12, 768, 12, 3072): ("vit_base_patch16_siglip_224", 224),
    (378, 14, 27, 1152, 16, 4304): ("vit_so400m_patch14_siglip_384", 384),
    (384, 16, 40, 1536, 16, 6144): ("vit_giantopt_patch16_siglip_384", 384),
}
_VISION_KEYS = ("image_size", "patch_size", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size")
TIMM_DIR = "timm_vision"  # the export's timm config folder (debug size)
_TIMM_BASE = "vit_base_patch16_siglip_224"  # the registered SigLIP ViT the folder's model_args resize
# Tokenizer cleaning that equals tulip_mega/data/tokenizer.py (lower-case, squeeze spaces; punctuation kept).
TOKENIZER_KWARGS = {"clean": "lower"}
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


def register_debug_timm_model() -> None:
    """Register the debug size's vision tower in timm (idempotent; no-op without timm)."""
    try:
        from timm.models import register_model
        from timm.models._registry import is_model
        from timm.models.vision_transformer import _create_vision_transformer
    except ImportError:
        return
    if is_model(DEBUG_TIMM_NAME):
        return

    def vit_tulip_debug_patch8_siglip_32(pretrained: bool = False, **kwargs):
        """tulip-mega's debug size: SigLIP-style ViT, 32 px, patch 8, 2 x 64 wide, MAP pool, tanh-GELU."""
        args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                    class_token=False, global_pool="map", act_layer="gelu_tanh")
        return _create_vision_transformer(DEBUG_TIMM_NAME, pretrained=pretrained, **dict(args, **kwargs))

    vit_tulip_debug_patch8_siglip_32.__name__ = DEBUG_TIMM_NAME
    register_model(vit_tulip_debug_patch8_siglip_32)


register_debug_timm_model()


def _mlp_ratio(width: int, ffn: int) -> float:
    """The shortest ratio r (4 decimals, like the release configs' 3.7362) with int(width * r) == ffn."""
    r = round(ffn / width, 4)
    while int(width * r) != ffn:
        r = round(r + 1e-4, 4)
    return r


def timm_vision_config(vision: dict) -> dict:
    """timm's config.json for our vision tower: a registered SigLIP ViT resized by `model_args`
    (what timm's `local-dir:` loader reads; SigLIP MAP head, no class token, tanh-GELU)."""
    v = vision
    return {
        "architecture": _TIMM_BASE,
        "num_classes": 0,
        "model_args": {"img_size": v["image_size"], "patch_size": v["patch_size"], "embed_dim": v["hidden_size"],
                       "depth": v["num_layers"], "num_heads": v["num_heads"],
                       "mlp_ratio": v["ffn_hidden_size"] / v["hidden_size"], "class_token": False,
                       "global_pool": "map", "act_layer": "gelu_tanh"},
        "pretrained_cfg": {"input_size": [3, v["image_size"], v["image_size"]], "interpolation": "bicubic",
                           "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "crop_pct": 1.0, "num_classes": 0},
    }


def open_clip_model_config(cfg: PlainConfig, hf_tokenizer_name: str, init_logit_bias: float = -10.0,
                           timm_dir: Optional[Path] = None) -> dict:
    """open_clip's model config for a TULIP architecture (the TULIP release layout). With
    `timm_dir` (the export's timm config folder) the debug size names it as `local-dir:`."""
    v, t = cfg.vision, cfg.text
    arch = tuple(v[k] for k in _VISION_KEYS)
    if arch not in TIMM_VISION:
        known = ", ".join(f"{dict(zip(_VISION_KEYS, a))}" for a in TIMM_VISION)
        raise ConversionError(f"no timm model for the vision tower {dict(zip(_VISION_KEYS, arch))}: open_clip "
                              f"builds timm vision towers by name; the known ones are {known}")
    timm_name, image_size = TIMM_VISION[arch]
    if timm_name == DEBUG_TIMM_NAME and timm_dir is not None:
        timm_name = f"local-dir:{Path(timm_dir).resolve()}"
    text = {
        "context_length": t["context_length"],
        "vocab_size": t["vocab_size"],
        "hf_tokenizer_name": hf_tokenizer_name,
        "tokenizer_kwargs": dict(TOKENIZER_KWARGS),
        "width": t["hidden_size"],
        "heads": t["num_heads"],
        "layers": t["num_layers"],
    }
    if t["ffn_hidden_size"] != 4 * t["hidden_size"]:
        text["mlp_ratio"] = _mlp_ratio(t["hidden_size"], t["ffn_hidden_size"])
    text.update({
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": cfg.layernorm_eps},
        "act_kwargs": {"approximate": "tanh"},
    })
    return {
        "embed_dim": v["hidden_size"],
        "init_logit_bias": init_logit_bias,
        "custom_text": True,
        "vision_cfg": {"image_size": image_size, "timm_model_name": timm_name, "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": text,
    }


def _timm_folder_name(name: Optional[str], folder: Optional[Path]) -> Optional[str]:
    """The timm model a `local-dir:` vision tower stands for (its config.json read from the named
    folder, or from <folder>/timm_vision when the export was moved); other names unchanged."""
    if not (isinstance(name, str) and name.startswith("local-dir:")):
        return name
    where = Path(name[len("local-dir:"):])
    if not (where / "config.json").is_file() and folder is not None:
        where = Path(folder) / TIMM_DIR
    if not (where / "config.json").is_file():
        raise ConversionError(f"vision_cfg.timm_model_name={name!r}: no timm config.json there"
                              + (f" nor in {Path(folder) / TIMM_DIR}" if folder is not None else ""))
    data = json.loads((where / "config.json").read_text())
    for arch, (timm_name, _) in TIMM_VISION.items():
        v = dict(zip(_VISION_KEYS, arch))
        if data.get("architecture") == _TIMM_BASE and data.get("model_args") == timm_vision_config(v)["model_args"]:
            return timm_name
    raise ConversionError(f"{where / 'config.json'}: not one of TULIP's vision towers ({data.get('model_args')})")


def plain_config_from_open_clip(model_cfg: dict, source: str = "open_clip config",
                                folder: Optional[Path] = None) -> PlainConfig:
    """Our architecture of an open_clip model config (refusing what TULIP cannot hold); `folder`:
    where the config lives (to find a moved export's timm config folder)."""
    vc, tc = dict(model_cfg.get("vision_cfg", {})), model_cfg.get("text_cfg", {})
    vc["timm_model_name"] = _timm_folder_name(vc.get("timm_model_name"), folder)
    by_name = {name: arch for arch, (name, _) in TIMM_VISION.items()}
    problems = []
    if vc.get("timm_model_name") not in by_name:
        problems.append(f"vision_cfg.timm_model_name={vc.get('timm_model_name')!r} (known: {sorted(by_name)})")
    if vc.get("timm_pool") != "map" or vc.get("timm_proj") not in ("none", ""):
        problems.append(f"vision_cfg timm_pool={vc.get('timm_pool')!r} timm_proj={vc.get('timm_proj')!r} "
                        "(TULIP: MAP pool, no projection)")
    for key, want in (("no_causal_mask", True), ("proj_bias", True), ("pool_type", "last")):
        if tc.get(key) != want:
            problems.append(f"text_cfg.{key}={tc.get(key)!r} (TULIP: {want!r})")
    if (tc.get("act_kwargs") or {}).get("approximate") != "tanh":
        problems.append(f"text_cfg.act_kwargs={tc.get('act_kwargs')!r} (TULIP uses tanh-GELU)")
    if tc.get("embed_cls") or tc.get("ls_init_value") is not None:
        problems.append("text_cfg has a class token or layer scale (TULIP has neither)")
    if problems:
        raise ConversionError(f"{source} cannot be expressed as a TULIP model: " + "; ".join(problems))
    v = dict(zip(_VISION_KEYS, by_name[vc["timm_model_name"]]))
    if model_cfg.get("embed_dim") != v["hidden_size"]:
        raise ConversionError(f"{source}: embed_dim={model_cfg.get('embed_dim')} != vision width {v['hidden_size']} "
                              "(TULIP projects text to the vision width)")
    width = tc["width"]
    text = dict(vocab_size=tc["vocab_size"], context_length=tc["context_length"], num_layers=tc["layers"],
                hidden_size=width, num_heads=tc["heads"], ffn_hidden_size=int(width * tc.get("mlp_ratio", 4.0)))
    return PlainConfig(vision=v, text=text, layernorm_eps=float((tc.get("norm_kwargs") or {}).get("eps", 1e-5)))


# --- tensor names: plain (HF SiglipModel) <-> open_clip CustomTextCLIP ----------------------
_DIRECT = {
    "vision_model.embeddings.patch_embedding.weight": "visual.trunk.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual.trunk.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "visual.trunk.norm.weight",
    "vision_model.post_layernorm.bias": "visual.trunk.norm.bias",
    "vision_model.head.attention.out_proj.weight": "visual.trunk.attn_pool.proj.weight",
    "vision_model.head.attention.out_proj.bias": "visual.trunk.attn_pool.proj.bias",
    "vision_model.head.layernorm.weight": "visual.trunk.attn_pool.norm.weight",
    "vision_model.head.layernorm.bias": "visual.trunk.attn_pool.norm.bias",
    "vision_model.head.mlp.fc1.weight": "visual.trunk.attn_pool.mlp.fc1.weight",
    "vision_model.head.mlp.fc1.bias": "visual.trunk.attn_pool.mlp.fc1.bias",
    "vision_model.head.mlp.fc2.weight": "visual.trunk.attn_pool.mlp.fc2.weight",
    "vision_model.head.mlp.fc2.bias": "visual.trunk.attn_pool.mlp.fc2.bias",
    "vision_model.head.probe": "visual.trunk.attn_pool.latent",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "text_model.head.weight": "text.text_projection.weight",
    "text_model.head.bias": "text.text_projection.bias",
}
# Per-layer sub-keys: plain -> (vision trunk block, text resblock); q/k/v are fused separately.
_LAYER = {
    "layer_norm1": ("norm1", "ln_1"),
    "layer_norm2": ("norm2", "ln_2"),
    "self_attn.out_proj": ("attn.proj", "attn.out_proj"),
    "mlp.fc1": ("mlp.fc1", "mlp.c_fc"),
    "mlp.fc2": ("mlp.fc2", "mlp.c_proj"),
}
_PREFIX = {"vision_model": "visual.trunk.blocks", "text_model": "text.transformer.resblocks"}
_QKV = {"vision_model": "attn.qkv.{}", "text_model": "attn.in_proj_{}"}


def plain_to_open_clip(state: dict[str, torch.Tensor], cfg: PlainConfig) -> dict[str, torch.Tensor]:
    """Plain-model tensors -> an open_clip CustomTextCLIP state dict (q/k/v fused, MAP in_proj split)."""
    out: dict[str, torch.Tensor] = {}
    for name in ("logit_scale", "logit_bias"):
        out[name] = state[name].reshape(())
    for src, dst in _DIRECT.items():
        out[dst] = state[src]
    out["visual.trunk.pos_embed"] = state["vision_model.embeddings.position_embedding.weight"].unsqueeze(0)
    h = cfg.vision["hidden_size"]
    for kind in ("weight", "bias"):
        in_proj = state[f"vision_model.head.attention.in_proj_{kind}"]
        out[f"visual.trunk.attn_pool.q.{kind}"] = in_proj[:h]
        out[f"visual.trunk.attn_pool.kv.{kind}"] = in_proj[h:]
    for ours, theirs in _layer_names(cfg):
        if isinstance(ours, tuple):  # q, k, v -> one fused in_proj
            out[theirs] = torch.cat([state[name] for name in ours], dim=0)
        else:
            out[theirs] = state[ours]
    return {k: v.contiguous() for k, v in out.items()}


def _layer_names(cfg: PlainConfig):
    """(plain name, open_clip name) of every per-layer tensor of both towers; for the attention
    input projection the plain side is the (q, k, v) names of the one fused open_clip tensor."""
    for tower, n_layers, col in (("vision_model", cfg.vision["num_layers"], 0),
                                 ("text_model", cfg.text["num_layers"], 1)):
        for i in range(n_layers):
            ours, theirs = f"{tower}.encoder.layers.{i}", f"{_PREFIX[tower]}.{i}"
            for kind in ("weight", "bias"):
                for plain_sub, open_clip_sub in _LAYER.items():
                    yield f"{ours}.{plain_sub}.{kind}", f"{theirs}.{open_clip_sub[col]}.{kind}"
                yield (tuple(f"{ours}.self_attn.{p}_proj.{kind}" for p in "qkv"),
                       f"{theirs}.{_QKV[tower].format(kind)}")


def open_clip_to_plain(state: dict[str, torch.Tensor], cfg: PlainConfig) -> dict[str, torch.Tensor]:
    """The inverse of `plain_to_open_clip`; raises naming missing or unexpected open_clip keys."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    try:
        for name in ("logit_scale", "logit_bias"):
            out[name] = state.pop(name).reshape(1)
        for dst, src in _DIRECT.items():
            out[dst] = state.pop(src)
        out["vision_model.embeddings.position_embedding.weight"] = state.pop("visual.trunk.pos_embed").squeeze(0)
        for kind in ("weight", "bias"):
            out[f"vision_model.head.attention.in_proj_{kind}"] = torch.cat(
                [state.pop(f"visual.trunk.attn_pool.q.{kind}"), state.pop(f"visual.trunk.attn_pool.kv.{kind}")])
        for ours, theirs in _layer_names(cfg):
            if isinstance(ours, tuple):  # one fused in_proj -> q, k, v
                out.update({name: t.contiguous() for name, t in zip(ours, state.pop(theirs).chunk(3, dim=0))})
            else:
                out[ours] = state.pop(theirs)
    except KeyError as e:
        raise ConversionError(f"open_clip state dict has no {e.args[0]!r}: not a TULIP/SigLIP CustomTextCLIP "
                              "of the configured size") from None
    if state:
        raise ConversionError(f"open_clip state dict has keys TULIP cannot hold: {sorted(state)[:8]}")
    return out


# --- export ----------------------------------------------------------------------------------
def export_open_clip(checkpoint: Union[str, Path], out: Union[str, Path], tokenizer: Optional[Union[str, Path]] = None,
                     layernorm_eps: Optional[float] = None, log: Callable[[str], None] = print) -> dict:
    """Dist checkpoint -> an open_clip hub-layout folder (weights, config, tokenizer)."""
    from safetensors.torch import load_file, save_file

    checkpoint, out = Path(checkpoint), Path(out)
    tokenizer = tokenizer or run_tokenizer(checkpoint)
    if tokenizer is None:
        raise ConversionError("--to open_clip needs the run's SentencePiece model (--tokenizer spm.model, or a "
                              "run config.yaml beside the checkpoint naming data.tokenizer): open_clip would "
                              "otherwise fall back to CLIP's BPE tokenizer, whose ids mean nothing to this model")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        stats = convert_checkpoint(checkpoint, Path(tmp), layernorm_eps=layernorm_eps, log=log)
        plain = load_file(str(Path(tmp) / WEIGHTS_NAME))
    cfg: PlainConfig = stats["config"]
    # open_clip's local-dir:/hf-hub: loaders take the tokenizer from the folder itself; the absolute
    # path serves get_tokenizer for a config registered by name (open_clip.add_model_config).
    model_cfg = open_clip_model_config(cfg, hf_tokenizer_name=str(out.resolve()),
                                       init_logit_bias=_run_bias_init(checkpoint), timm_dir=out / TIMM_DIR)
    if model_cfg["vision_cfg"]["timm_model_name"].startswith("local-dir:"):
        (out / TIMM_DIR).mkdir(exist_ok=True)
        (out / TIMM_DIR / "config.json").write_text(json.dumps(timm_vision_config(cfg.vision), indent=2) + "\n")
    save_file(plain_to_open_clip(plain, cfg), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    del plain
    write_processor(out, tokenizer, cfg)
    # Bicubic squash resize, like tulip-mega eval's loader (tulip_mega/data/simple_loader.py).
    preprocess = {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "interpolation": "bicubic",
                  "resize_mode": "squash", "size": model_cfg["vision_cfg"]["image_size"]}
    (out / CONFIG_FILE).write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess, "tulip_plain": cfg.to_json()}, indent=2) + "\n")
    log(f"wrote open_clip model ({model_cfg['vision_cfg']['timm_model_name']} + TextTransformer) and tokenizer "
        f"({tokenizer}) to {out}; load with open_clip.create_model_and_transforms('local-dir:{out}')")
    return stats


def _run_bias_init(checkpoint: Path) -> float:
    """model.bias_init of the run's config.yaml (open_clip's init_logit_bias), -10 when unknown."""
    value = run_config_value(checkpoint, "model", "bias_init")
    return -10.0 if value is None else float(value)


# --- import ----------------------------------------------------------------------------------
def load_open_clip_state(folder: Union[str, Path]) -> tuple[PlainConfig, dict[str, torch.Tensor]]:
    """(architecture, plain-named full tensors) of an open_clip folder (open_clip_config.json + weights)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no {CONFIG_FILE} (an open_clip hub-layout folder is expected)")
    data = json.loads(config_path.read_text())
    cfg = plain_config_from_open_clip(data.get("model_cfg", data), str(config_path), folder)
    weights = [p for p in (folder / WEIGHTS_FILE, folder / "open_clip_pytorch_model.bin") if p.is_file()]
    if not weights:
        raise ConversionError(f"{folder} has neither {WEIGHTS_FILE} nor open_clip_pytorch_model.bin")
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights[0]))
    else:
        state = torch.load(str(weights[0]), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    return cfg, open_clip_to_plain(state, cfg)


def import_open_clip(folder: Union[str, Path], model_cfg=None) -> dict[str, torch.Tensor]:
    """open_clip folder -> full tensors keyed like our dist checkpoint (layers stacked, fused QKV).

    With `model_cfg` (the recipe's `model` section) the architecture must equal it, every
    differing key named.
    """
    cfg, state = load_open_clip_state(folder)
    if model_cfg is not None:
        check_matches_recipe(cfg, model_cfg, folder, "model.init_from_open_clip", "open_clip model")
    return plain_model_to_megatron(state, cfg)

