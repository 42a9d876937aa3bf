"""Build this rank's pipeline stage of the model from a resolved recipe."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state

from tulip_mega.config.streams import Streams, input_streams, model_heads
from tulip_mega.models.init import initialize_parameters
from tulip_mega.models.megatron_config import decoder_config, tower_config
from tulip_mega.models.specs import use_transformer_engine
from tulip_mega.models.tulip import TulipModel
from tulip_mega.parallel.init import device


def build_model(cfg, use_te: Optional[bool] = None, streams: Optional[Streams] = None) -> TulipModel:
    """The TulipModel stage for this pipeline rank, initialised layout-invariantly, on device.

    Needs megatron's parallel state initialised (tulip_mega.parallel.init.init_parallel).
    Layers are Transformer Engine or local per `model.transformer_impl` (models/specs.py);
    `use_te` overrides that (benchmarks). Starting from released weights (`model.init_from_hf`
    / `init_from_open_clip`) is a separate step: tulip_mega.convert.pretrained.load_pretrained.
    `streams`: the run's resolved input streams (the trainer derives them once; default:
    `input_streams(cfg)`). The model itself gets only `cfg.model`, the streams and its heads.
    """
    if use_te is None:
        use_te = use_transformer_engine(cfg.model.transformer_impl)
    vision_config = tower_config(cfg, "vision")
    text_config = tower_config(cfg, "text")
    heads = model_heads(cfg)
    decoder_configs = {}
    if heads.mae_decoder:
        decoder_configs["mae"] = decoder_config(cfg, "mae")
    if heads.text_decoder:
        decoder_configs["text"] = decoder_config(cfg, "text")
    model = TulipModel(
        vision_config,
        text_config,
        cfg.model,
        streams or input_streams(cfg),
        heads,
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
    return model
