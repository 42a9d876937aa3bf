"""Start a freshly built model stage from released weights: `model.init_from_hf` (a Hugging
Face SiglipModel directory) or `model.init_from_open_clip` (an open_clip / TULIP release folder).

Each importer turns the foreign checkpoint into full tensors in our megatron key space;
`tulip_mega.models.init.load_full_tensors` copies this rank's slice into the stage, so any
TP x PP layout loads the same weights. The training-only modules (decoders, aug projectors,
the ii/tt logit parameters) keep their random init.
"""

from __future__ import annotations

from tulip_mega.models.init import load_full_tensors
from tulip_mega.models.tulip import TRAINING_ONLY


def load_pretrained(model, model_cfg) -> None:
    """Overwrite `model`'s random init with the weights the recipe's `model.init_from_*` names
    (nothing when neither is set); the architecture must match (checked, naming the key)."""
    if model_cfg.init_from_hf:
        from tulip_mega.convert.hf import import_hf_siglip

        load_full_tensors(model, import_hf_siglip(model_cfg.init_from_hf, model_cfg), optional=TRAINING_ONLY)
    if model_cfg.init_from_open_clip:
        from tulip_mega.convert.openclip import import_open_clip

        load_full_tensors(model, import_open_clip(model_cfg.init_from_open_clip, model_cfg), optional=TRAINING_ONLY)
