"""Map a recipe (tulip_mega.config.Config) onto megatron-core TransformerConfigs, one per tower
and one per reconstruction decoder.

Parallel sizes, precision (bf16/fp32, FP8 via Transformer Engine), activation recompute and
sequence parallel all reach the towers through these configs: the tower code never reads the
recipe for them. The SigLIP architecture choices (pre-norm LayerNorm, biases everywhere,
tanh-GELU MLP, no dropout) are fixed here so an export to Hugging Face `SiglipModel` is exact.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from tulip_mega.parallel.init import compute_dtype, use_cuda

Tower = Literal["vision", "text"]
DecoderName = Literal["mae", "text"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """SigLIP's MLP activation (gelu_pytorch_tanh in Hugging Face)."""
    return F.gelu(x, approximate="tanh")


def params_dtype(cfg) -> torch.dtype:
    """Compute dtype of the recipe's `precision.dtype` (the 'auto' rule is parallel.init.compute_dtype)."""
    return torch.bfloat16 if compute_dtype(cfg.precision.dtype) == "bf16" else torch.float32


def tower_config(cfg, tower: Tower) -> TransformerConfig:
    """The TransformerConfig of one tower (sizes from the resolved recipe)."""
    t = cfg.model.vision if tower == "vision" else cfg.model.text
    return _transformer_config(
        cfg, t, pipeline_parallel=cfg.parallel.pipeline_parallel, recompute=True,
        layout=pipeline_layout(cfg, tower),
    )


def pipeline_layout(cfg, tower: Tower):
    """megatron's `pipeline_model_parallel_layout` for the tower's share of each stage (of each
    chunk under `parallel.virtual_pipeline`) under `parallel.pipeline_split`
    (models/pipeline_split.py), or None for megatron's default split. Under interleaving the
    layout is what tells megatron the virtual size (`virtual_pipeline_model_parallel_size`) and
    each chunk's layers and global layer offset."""
    from tulip_mega.models.pipeline_split import needs_layout, tower_layout, validate_split

    if cfg.parallel.pipeline_parallel == 1:
        return None
    split = validate_split(cfg)
    virtual = cfg.parallel.virtual_pipeline
    if not needs_layout(split, cfg.model.vision.num_layers, cfg.model.text.num_layers, virtual):
        return None
    return tower_layout(split, tower, virtual)


def batch_p2p_comm(cfg) -> bool:
    """Whether megatron batches each step's pipeline sends and receives into one
    `batch_isend_irecv` (its default), which is wrong for interleaved stages at PP=2.

    There a rank's previous and next pipeline rank are the same peer, and the interleaved
    schedule's steady state sends an activation forward and a gradient backward in one batch:
    megatron posts them as [send to prev (gradient), send to next (activation)] while the peer
    posts [recv from prev (activation), recv from next (gradient)]; point-to-point messages
    between two ranks match in posting order, and both tensors have the packed shape, so
    activation and gradient arrive swapped without any error (measured with gloo: the loss
    and every gradient differ from PP=1 from the first steady-state micro-batch on).
    megatron's unbatched path (`_p2p_ops`) orders the operations by rank parity and sends one
    direction over a second process group when the pipeline group has two ranks, so the two
    messages cannot be confused; it is used in exactly that case."""
    return not (cfg.parallel.virtual_pipeline > 1 and cfg.parallel.pipeline_parallel == 2)


def decoder_config(cfg, which: DecoderName) -> TransformerConfig:
    """The TransformerConfig of a reconstruction decoder ('mae' pixels or 'text' caption).

    Same precision, FP8, TP size and sequence parallel as the towers, the decoder's own sizes
    (`model.mae_decoder` / `model.text_decoder`), and `pipeline_model_parallel_size=1`: a
    decoder is one block that lives entirely on the LAST pipeline stage. megatron-core 0.16.1
    derives both the layers a TransformerBlock builds (`get_num_layers_to_build`:
    num_layers // pipeline_model_parallel_size) and its layer offset
    (`get_transformer_layer_offset`: 0 whenever pipeline_model_parallel_size == 1, whatever the
    pp rank) from this config, so the decoder builds all `num_layers` layers numbered from 1,
    and its `sharded_state_dict()` (keys and layer offsets) is identical under any PP: its
    checkpoints reshard like the towers'. The default process groups stay in use (TP splits
    the decoder like the towers; the pp group is not consulted once the size is 1), so no
    process group has to be created, which would be a collective over every stage.

    Activation recompute is off: the decoders are small (2 layers by default) and the
    recipe's `recompute.num_layers` is sized for the towers' layers per stage.
    """
    if which not in ("mae", "text"):
        raise ValueError(f"decoder_config: which={which!r}; expected 'mae' or 'text'")
    dec = cfg.model.mae_decoder if which == "mae" else cfg.model.text_decoder
    unset = [k for k in ("hidden_size", "num_heads", "ffn_hidden_size") if getattr(dec, k) is None]
    if unset:
        raise ValueError(f"model.{which}_decoder.{unset[0]} is unset: pass a config resolved by load_config")
    return _transformer_config(cfg, dec, pipeline_parallel=1, recompute=False)


def _transformer_config(cfg, t, pipeline_parallel: int, recompute: bool, layout=None) -> TransformerConfig:
    """A TransformerConfig with the sizes of `t` (num_layers, hidden_size, num_heads,
    ffn_hidden_size) and everything else from the recipe."""
    dtype = params_dtype(cfg)
    cuda = use_cuda()
    rc = cfg.recompute
    granularity = rc.granularity if recompute else None
    fp8 = {}
    if cfg.precision.fp8 is not None:
        fp8 = dict(
            fp8=cfg.precision.fp8,
            fp8_recipe=cfg.precision.fp8_recipe,
            fp8_amax_history_len=cfg.precision.fp8_amax_history_len,
            fp8_amax_compute_algo=cfg.precision.fp8_amax_compute_algo,
        )
    return TransformerConfig(
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        num_attention_heads=t.num_heads,
        ffn_hidden_size=t.ffn_hidden_size,
        kv_channels=t.hidden_size // t.num_heads,
        # Parallelism
        tensor_model_parallel_size=cfg.parallel.tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        pipeline_model_parallel_layout=layout,
        sequence_parallel=cfg.parallel.sequence_parallel,
        pipeline_dtype=dtype,
        # On a CPU, megatron's batched p2p would call torch.cuda.synchronize().
        batch_p2p_sync=cuda,
        batch_p2p_comm=batch_p2p_comm(cfg),
        # Precision
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        autocast_dtype=dtype,
        **fp8,
        # SigLIP architecture
        normalization="LayerNorm",
        layernorm_epsilon=cfg.model.layernorm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        # Fusions are GPU kernels; the unfused paths compute the same thing.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # Initialisation is done layout-invariantly afterwards (tulip_mega.models.init).
        use_cpu_initialization=not cuda,
        perform_initialization=False,
        init_method_std=cfg.model.init_std,
        # Activation recompute
        recompute_granularity=granularity,
        recompute_method=rc.method if granularity == "full" else None,
        recompute_num_layers=rc.num_layers if granularity == "full" else None,
    )

