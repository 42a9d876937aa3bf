"""Build this rank's pipeline stage of the model (its model chunks under interleaving) from a resolved recipe."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state

from tulip_mega.config.run_layout import RunLayout
from tulip_mega.config.streams import model_heads
from tulip_mega.models.init import initialize_parameters, mark_tensor_parallel
from tulip_mega.models.megatron_config import LayerChoices, decoder_config, layer_choices, tower_config
from tulip_mega.models.specs import use_transformer_engine
from tulip_mega.models.tulip import TulipModel
from tulip_mega.parallel.init import device


def build_model(cfg, layout: RunLayout, use_te: Optional[bool] = None,
                choices: Optional[LayerChoices] = None) -> TulipModel:
    """The TulipModel stage for this pipeline rank without interleaving (one model part):
    `build_model_chunks(...)[0]`. Under `parallel.virtual_pipeline` > 1 a rank holds several
    parts: use `build_model_chunks`."""
    if layout.virtual_pipeline > 1:
        raise ValueError("build_model builds one pipeline stage; parallel.virtual_pipeline="
                         f"{layout.virtual_pipeline} needs build_model_chunks (one model per virtual stage)")
    return build_model_chunks(cfg, layout, use_te, choices)[0]


def build_model_chunks(cfg, layout: RunLayout, use_te: Optional[bool] = None,
                       choices: Optional[LayerChoices] = None) -> list[TulipModel]:
    """This rank's model parts, one TulipModel per virtual stage (one without interleaving), in
    megatron's chunk order, each initialised layout-invariantly (its layers carry their global
    numbers, so the weights are those of the PP=1 model with the same seed) and on device.

    Needs megatron's parallel state initialised (tulip_mega.parallel.init.init_parallel).
    `layout`: the run's resolved layout (input streams, pipeline split). Layers are Transformer
    Engine or local per `model.transformer_impl` (models/specs.py); `use_te` overrides that
    (benchmarks). `choices`: which blocks run FP8 and the GPU switches (decided here when
    None). As megatron-core's own models do, the parts share one TransformerConfig per tower;
    only the first part of the first stage embeds and only the last part of the last stage
    holds the heads, decoders and losses. Released weights (`model.init_from_hf` /
    `init_from_open_clip`) are a separate step: tulip_mega.convert.pretrained.load_pretrained.
    """
    if use_te is None:
        use_te = use_transformer_engine(cfg.model.transformer_impl)
    choices = choices or layer_choices(cfg, use_te, layout)
    configs = {tower: tower_config(cfg, tower, choices, layout) for tower in ("vision", "text")}
    heads = model_heads(cfg)
    decoder_configs = {which: decoder_config(cfg, which, choices)
                       for which, on in (("mae", heads.mae_decoder), ("text", heads.text_decoder),
                                         ("locca", heads.locca_decoder)) if on}
    virtual = layout.virtual_pipeline
    parts = []
    for chunk in range(virtual):
        vp_stage = chunk if virtual > 1 else None
        model = TulipModel(
            configs["vision"], configs["text"], cfg.model, layout.streams, heads,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            use_te=use_te, decoder_configs=decoder_configs, vp_stage=vp_stage,
            loss_cfg=cfg.loss,
        )
        model.to(device=device(), dtype=configs["vision"].params_dtype)
        if model.teacher is not None:
            model.teacher.freeze_and_keep_fp32()
        initialize_parameters(model, seed=cfg.run.seed, std=cfg.model.init_std, num_layers={
            "vision_block": cfg.model.vision.num_layers,
            "text_block": cfg.model.text.num_layers,
            "mae_decoder": cfg.model.mae_decoder.num_layers,
            "text_decoder": cfg.model.text_decoder.num_layers,
            "locca_decoder": cfg.model.locca_decoder.num_layers,
        })
        mark_tensor_parallel(model)
        parts.append(model)
    return parts
