"""Build this rank's pipeline stage of the model (its model chunks under interleaving) from a resolved recipe."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state

from tulip_mega.config.streams import Streams, input_streams, model_heads
from tulip_mega.models.init import initialize_parameters, mark_tensor_parallel
from tulip_mega.models.megatron_config import LayerChoices, decoder_config, layer_choices, tower_config
from tulip_mega.models.specs import use_transformer_engine
from tulip_mega.models.tulip import TulipModel
from tulip_mega.parallel.init import device


def build_model(cfg, use_te: Optional[bool] = None, streams: Optional[Streams] = None,
                choices: Optional[LayerChoices] = None) -> TulipModel:
    """The TulipModel stage for this pipeline rank, initialised layout-invariantly, on device.

    Needs megatron's parallel state initialised (tulip_mega.parallel.init.init_parallel).
    Layers are Transformer Engine or local per `model.transformer_impl` (models/specs.py);
    `use_te` overrides that (benchmarks). Starting from released weights (`model.init_from_hf`
    / `init_from_open_clip`) is a separate step: tulip_mega.convert.pretrained.load_pretrained.
    `streams`: the run's resolved input streams (the trainer derives them once; default:
    `input_streams(cfg)`). The model itself gets only `cfg.model`, the streams and its heads.
    Under `parallel.virtual_pipeline` > 1 a rank holds several chunks: use `build_model_chunks`.
    """
    if cfg.parallel.virtual_pipeline > 1:
        raise ValueError("build_model builds one pipeline stage; parallel.virtual_pipeline="
                         f"{cfg.parallel.virtual_pipeline} needs build_model_chunks (one model per virtual stage)")
    return build_model_chunks(cfg, use_te, streams, choices)[0]


def build_model_chunks(cfg, use_te: Optional[bool] = None, streams: Optional[Streams] = None,
                       choices: Optional[LayerChoices] = None) -> list[TulipModel]:
    """This rank's model chunks, one TulipModel per virtual stage (`parallel.virtual_pipeline`,
    one chunk without interleaving), in megatron's chunk order, each initialised
    layout-invariantly (its layers carry their global numbers, so the weights are those of
    the PP=1 model with the same seed).

    As megatron-core's own models do, the chunks share one TransformerConfig per tower; only
    the first chunk of the first stage embeds (`pre_process`) and only the last chunk of the
    last stage holds the heads, decoders and losses (`post_process`), decided by
    `parallel_state.is_pipeline_first/last_stage(ignore_virtual=False, vp_stage=...)`.
    `choices`: which blocks run FP8 and the GPU switches (models/megatron_config.layer_choices,
    decided here when None).
    """
    if use_te is None:
        use_te = use_transformer_engine(cfg.model.transformer_impl)
    choices = choices or layer_choices(cfg, use_te)
    vision_config = tower_config(cfg, "vision", choices)
    text_config = tower_config(cfg, "text", choices)
    heads = model_heads(cfg)
    decoder_configs = {}
    if heads.mae_decoder:
        decoder_configs["mae"] = decoder_config(cfg, "mae", choices)
    if heads.text_decoder:
        decoder_configs["text"] = decoder_config(cfg, "text", choices)
    virtual = cfg.parallel.virtual_pipeline
    chunks = []
    for chunk in range(virtual):
        vp_stage = chunk if virtual > 1 else None
        model = TulipModel(
            vision_config,
            text_config,
            cfg.model,
            streams or input_streams(cfg),
            heads,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            use_te=use_te,
            decoder_configs=decoder_configs,
            vp_stage=vp_stage,
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
        mark_tensor_parallel(model)
        chunks.append(model)
    return chunks
