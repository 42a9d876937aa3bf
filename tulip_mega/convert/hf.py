"""Hugging Face `transformers.SiglipModel` export and import.

Export (`tulip-mega convert CKPT --to hf OUT [--tokenizer spm.model]`): the plain model's
parameter names already are SiglipModel's, so the export is the plain conversion plus a
`SiglipConfig` (`config.json`) and, given the run's SentencePiece model, the files of a
`SiglipProcessor` (SiglipTokenizer + SiglipImageProcessor). Our text head projects the
last token to the vision width; SigLIP expresses that as `text_config.projection_size`, and
an installed transformers without that field is refused (unless the widths are equal).

Import (`import_hf_siglip(hf_dir)`): a SiglipModel directory -> full tensors in our megatron
key space (layers stacked, QKV fused), what `model.init_from_hf` loads into any TP x PP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from tulip_mega.convert.common import ConversionError, check_matches_recipe, run_tokenizer
from tulip_mega.convert.plain import convert_checkpoint, plain_model_to_megatron
from tulip_mega.convert.plain_model import CONFIG_NAME, PlainConfig
from tulip_mega.data.tokenizer import EOS_ID, PAD_ID, UNK_ID
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]  # tulip_mega.data.base


def _transformers_supports_projection() -> Optional[bool]:
    """True/False when transformers is installed (whether SiglipTextConfig has projection_size), else None."""
    try:
        from transformers import SiglipTextConfig
    except ImportError:
        return None
    return "projection_size" in SiglipTextConfig().to_dict()


def siglip_config(cfg: PlainConfig) -> dict:
    """The SiglipConfig dict for a TULIP architecture; raises ConversionError if it cannot be expressed."""
    v, t = cfg.vision, cfg.text
    if v["hidden_size"] != t["hidden_size"] and _transformers_supports_projection() is False:
        raise ConversionError(
            f"the text head projects width {t['hidden_size']} to the vision width {v['hidden_size']}, but the "
            "installed transformers' SiglipTextConfig has no projection_size (a recent transformers has it); "
            "upgrade transformers or export with --to pytorch")
    if v["image_size"] % v["patch_size"]:
        raise ConversionError(f"image_size {v['image_size']} is not a multiple of patch_size {v['patch_size']}")
    common = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=cfg.layernorm_eps, attention_dropout=0.0)
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "dtype": "float32",
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "siglip_text_model",
            "vocab_size": t["vocab_size"],
            "hidden_size": t["hidden_size"],
            "intermediate_size": t["ffn_hidden_size"],
            "num_hidden_layers": t["num_layers"],
            "num_attention_heads": t["num_heads"],
            "max_position_embeddings": t["context_length"],
            "projection_size": v["hidden_size"],
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "bos_token_id": None,
            **common,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": v["hidden_size"],
            "intermediate_size": v["ffn_hidden_size"],
            "num_hidden_layers": v["num_layers"],
            "num_attention_heads": v["num_heads"],
            "num_channels": 3,
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "vision_use_head": True,
            **common,
        },
        # Lets TulipPlainModel.from_pretrained read an HF export too.
        "tulip_plain": cfg.to_json(),
    }


def plain_config_from_siglip(d: dict) -> PlainConfig:
    """The TULIP architecture of a SiglipConfig dict (refusing what TULIP cannot hold)."""
    t, v = d["text_config"], d["vision_config"]
    problems = []
    for name, sub in (("text", t), ("vision", v)):
        act = sub.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            problems.append(f"{name}_config.hidden_act={act!r} (TULIP uses tanh-GELU)")
    if not v.get("vision_use_head", True):
        problems.append("vision_config.vision_use_head=false (TULIP pools with a MAP head)")
    proj = t.get("projection_size", t["hidden_size"])
    if proj != v["hidden_size"]:
        problems.append(f"text projection_size {proj} != vision hidden_size {v['hidden_size']}")
    eps = {t.get("layer_norm_eps", 1e-6), v.get("layer_norm_eps", 1e-6)}
    if len(eps) > 1:
        problems.append(f"different layer_norm_eps per tower {sorted(eps)} (TULIP has one model.layernorm_eps)")
    if problems:
        raise ConversionError("this SiglipModel cannot be expressed as a TULIP model: " + "; ".join(problems))
    return PlainConfig(
        vision=dict(image_size=v["image_size"], patch_size=v["patch_size"], num_layers=v["num_hidden_layers"],
                    hidden_size=v["hidden_size"], num_heads=v["num_attention_heads"],
                    ffn_hidden_size=v["intermediate_size"]),
        text=dict(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                  num_layers=t["num_hidden_layers"], hidden_size=t["hidden_size"], num_heads=t["num_attention_heads"],
                  ffn_hidden_size=t["intermediate_size"]),
        layernorm_eps=eps.pop(),
    )


def write_processor(out: Path, tokenizer_model: Union[str, Path], cfg: PlainConfig) -> None:
    """SiglipTokenizer (our SentencePiece model) + SiglipImageProcessor, saved as a SiglipProcessor."""
    from transformers import SiglipImageProcessor, SiglipProcessor, SiglipTokenizer

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
        raise ConversionError(f"{tokenizer_model} has pad/eos/unk ids {(sp.pad_id(), sp.eos_id(), sp.unk_id())}, "
                              f"expected {(PAD_ID, EOS_ID, UNK_ID)}")
    tok = SiglipTokenizer(
        vocab_file=str(tokenizer_model),
        eos_token=sp.id_to_piece(EOS_ID),
        unk_token=sp.id_to_piece(UNK_ID),
        pad_token=sp.id_to_piece(PAD_ID),
        model_max_length=cfg.text["context_length"],
        do_lower_case=True,
        # No attention_mask: our text tower attends to the padding too (as Google's SigLIP does, whose
        # tokenizer config says the same); with a mask transformers would compute other embeddings.
        model_input_names=["input_ids"],
    )
    size = cfg.vision["image_size"]
    images = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    SiglipProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(out))


# transformers' ZeroShotImageClassificationPipeline pads SigLIP text to exactly this many tokens
# (padding="max_length", max_length=64), whatever the model's max_position_embeddings.
HF_PIPELINE_SIGLIP_TOKENS = 64


def pipeline_padding_note(context_length: int) -> Optional[str]:
    """What to tell the user when the export cannot run in transformers' zero-shot pipeline:
    a model with another text context (recipes/tiny_cpu.yaml uses 16) raises there, while
    AutoProcessor + AutoModel pad to the model's own length and work."""
    if context_length == HF_PIPELINE_SIGLIP_TOKENS:
        return None
    return (f"note: text context_length is {context_length}: transformers' pipeline('zero-shot-image-classification') "
            f"pads SigLIP text to {HF_PIPELINE_SIGLIP_TOKENS} tokens and will raise on this model; use "
            f"AutoProcessor(text=..., padding='max_length') + AutoModel, which pad to its {context_length}")


def export_hf(checkpoint: Union[str, Path], out: Union[str, Path], tokenizer: Optional[Union[str, Path]] = None,
              layernorm_eps: Optional[float] = None, log: Callable[[str], None] = print) -> dict:
    """Dist checkpoint -> a directory `transformers.SiglipModel.from_pretrained` loads."""
    out = Path(out)
    stats = convert_checkpoint(checkpoint, out, layernorm_eps=layernorm_eps, log=log)
    cfg = stats["config"]
    hf_config = siglip_config(cfg)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        hf_config["dtype"] = str(f.get_tensor(next(iter(f.keys()))).dtype).removeprefix("torch.")
    (out / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    note = pipeline_padding_note(cfg.text["context_length"])
    if note:
        log(note)
    if tokenizer is None:
        tokenizer = run_tokenizer(checkpoint)
    if tokenizer is not None:
        write_processor(out, tokenizer, cfg)
        log(f"wrote SiglipProcessor files (tokenizer {tokenizer}) to {out}")
    else:
        log("no --tokenizer given: wrote the model only (no processor files)")
    return stats


def load_hf_state(hf_dir: Union[str, Path]) -> tuple[PlainConfig, dict[str, torch.Tensor]]:
    """(architecture, HF-named full tensors) of a SiglipModel directory (safetensors, sharded or not)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    cfg = plain_config_from_siglip(json.loads((hf_dir / CONFIG_NAME).read_text()))
    files = sorted(hf_dir.glob("model*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir} has no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    state.pop("text_model.embeddings.position_ids", None)  # a buffer in older transformers
    state.pop("vision_model.embeddings.position_ids", None)
    return cfg, state


def import_hf_siglip(hf_dir: Union[str, Path], model_cfg=None) -> dict[str, torch.Tensor]:
    """SiglipModel directory -> full tensors keyed like our dist checkpoint (layers stacked, fused QKV).

    With `model_cfg` (the recipe's `model` section) the SigLIP architecture must equal it,
    every differing key named (shape checks alone would miss e.g. the LayerNorm epsilon).
    """
    cfg, state = load_hf_state(hf_dir)
    if model_cfg is not None:
        check_matches_recipe(cfg, model_cfg, hf_dir, "model.init_from_hf", "SiglipModel")
    return plain_model_to_megatron(state, cfg)

