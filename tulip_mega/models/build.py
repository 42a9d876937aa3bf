"""Build this rank's pipeline stage of the model from a resolved recipe."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state

from tulip_mega.models.init import initialize_parameters, load_full_tensors
from tulip_mega.models.megatron_config import decoder_config, tower_config
from tulip_mega.models.tulip import TRAINING_ONLY, TulipModel
from tulip_mega.parallel.init import device


def build_model(cfg, use_te: Optional[bool] = None) -> TulipModel:
    """The TulipModel stage for this pipeline rank, initialised layout-invariantly, on device.

    Needs megatron's parallel state initialised (tulip_mega.parallel.init.init_parallel).
    With `model.init_from_hf` set, the random init is then overwritten by that Hugging Face
    SiglipModel's weights (each rank copies its own slice; the architecture must match), and
    likewise with `model.init_from_open_clip` by an open_clip folder's.
    """
    vision_config = tower_config(cfg, "vision")
    text_config = tower_config(cfg, "text")
    weights = cfg.loss.weights
    decoder_configs = {}
    if weights.mae > 0:
        decoder_configs["mae"] = decoder_config(cfg, "mae")
    if weights.text_recon > 0:
        decoder_configs["text"] = decoder_config(cfg, "text")
    model = TulipModel(
        vision_config,
        text_config,
        cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_te=use_te,
        decoder_configs=decoder_configs,
    )
    model.to(device=device(), dtype=vision_config.params_dtype)
    initialize_parameters(
        model,
        seed=cfg.run.seed,
        std=cfg.model.init_std,
        num_layers={
            "vision_block": cfg.model.vision.num_layers,
            "text_block": cfg.model.text.num_layers,
            "mae_decoder": cfg.model.mae_decoder.num_layers,
            "text_decoder": cfg.model.text_decoder.num_layers,
        },
    )
    if cfg.model.init_from_hf:
        from tulip_mega.convert.hf import import_hf_siglip

        load_full_tensors(model, import_hf_siglip(cfg.model.init_from_hf, cfg.model), optional=TRAINING_ONLY)
    if cfg.model.init_from_open_clip:
        from tulip_mega.convert.openclip import import_open_clip

        load_full_tensors(model, import_open_clip(cfg.model.init_from_open_clip, cfg.model), optional=TRAINING_ONLY)
    return model
