"""Map a recipe (tulip_mega.config.Config) onto megatron-core TransformerConfigs, one per tower
and one per reconstruction decoder.

Parallel sizes, precision (bf16/fp32, FP8 via Transformer Engine), activation recompute and
sequence parallel all reach the towers through these configs: the tower code never reads the
recipe for them. The SigLIP architecture choices (pre-norm LayerNorm, biases everywhere,
tanh-GELU MLP, no dropout) are fixed here so an export to Hugging Face `SiglipModel` is exact.

Two decisions are made once per build and handed to every config (`LayerChoices`): which
blocks run FP8 (config/fp8_shapes.py) and the GPU-only switches (`gpu_switches`: fusions,
FP8 amax reduction group, recompute under TE attention), all off on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from tulip_mega.config.fp8_shapes import Fp8Plan, fp8_plan
from tulip_mega.config.run_layout import RunLayout
from tulip_mega.models.specs import use_transformer_engine
from tulip_mega.parallel.init import compute_dtype, use_cuda

Tower = Literal["vision", "text"]
DecoderName = Literal["mae", "text", "locca"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """SigLIP's MLP activation (gelu_pytorch_tanh in Hugging Face)."""
    return F.gelu(x, approximate="tanh")


def params_dtype(cfg) -> torch.dtype:
    """Compute dtype of the recipe's `precision.dtype` (the 'auto' rule is parallel.init.compute_dtype)."""
    return torch.bfloat16 if compute_dtype(cfg.precision.dtype) == "bf16" else torch.float32


def apex_wgrad_available() -> bool:
    """Whether megatron's own linears can fuse weight-gradient accumulation: megatron-core
    imports apex's `fused_weight_gradient_mlp_cuda` for it (tensor_parallel/layers.py) and its
    ColumnParallelLinear refuses `gradient_accumulation_fusion` without it."""
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


@dataclasses.dataclass(frozen=True)
class GpuSwitches:
    """GPU-only speed switches, decided once from the machine (CUDA, Transformer Engine, apex)
    and the recipe. Every one is off on a CPU, where the unfused paths compute the same thing.

    - wgrad_fusion_te / wgrad_fusion_megatron: `gradient_accumulation_fusion`, weight gradients
      accumulated straight into DDP's fp32 `main_grad` (no bf16 gradient materialised and then
      added). TE layers do it themselves (`fuse_wgrad_accumulation`); megatron's own linears
      (the local layers, the caption decoder's vocabulary-parallel output layer) need apex.
    - bias_gelu_fusion: megatron's fused bias + GELU (fusions/fused_bias_gelu.py), which computes
      the tanh approximation, exactly SigLIP's gelu_tanh (the same constants in fp32); megatron
      selects it by `activation_func is F.gelu`, which the config then carries.
    - bias_dropout_fusion: megatron's compiled bias + dropout + residual add, the same function
      as the unfused one (fusions/fused_bias_dropout.py); dropout is 0.
      Both bias fusions need `precision.bias_fusions: true`: megatron-core compiles them with
      torch.compile, and on an H200 (torch 2.11, megatron-core 0.16.1, local layers) the step was
      slower with them (benchmarks/RESULTS.md "GPU acceptance").
    - tp_only_amax_reduction: delayed-scaling FP8 reduces amaxes over the TP group only
      (megatron's `tp_only_amax_red`), see `amax_reduction`.
    - drop_core_attn_recompute: selective recompute of core attention is redundant under TE's
      fused attention (flash / cuDNN store no score matrix; megatron warns), see
      `recompute_granularity`.
    masked_softmax_fusion (only megatron's DotProductAttention reads it; we use SDPA or TE's
    attention) and persist_layer_norm (apex's FusedLayerNorm only; we use TE's or torch's
    norms) have no effect on our layers and stay off.
    """

    cuda: bool
    te: bool
    wgrad_fusion_te: bool
    wgrad_fusion_megatron: bool
    bias_gelu_fusion: bool
    bias_dropout_fusion: bool
    tp_only_amax_reduction: bool
    drop_core_attn_recompute: bool


def gpu_switches(cfg, use_te: bool) -> GpuSwitches:
    """The GPU-only switches for this machine (see `GpuSwitches`); all off without CUDA."""
    cuda = use_cuda()
    te = bool(use_te) and cuda
    return GpuSwitches(
        cuda=cuda, te=te,
        wgrad_fusion_te=te,
        wgrad_fusion_megatron=cuda and apex_wgrad_available(),
        bias_gelu_fusion=cuda and cfg.precision.bias_fusions,
        bias_dropout_fusion=cuda and cfg.precision.bias_fusions,
        tp_only_amax_reduction=te and cfg.precision.fp8 is not None and cfg.precision.fp8_recipe == "delayed",
        drop_core_attn_recompute=te and cfg.recompute.granularity == "selective",
    )


@dataclasses.dataclass(frozen=True)
class LayerChoices:
    """What every block's TransformerConfig is built with beyond the recipe's sizes: which
    blocks run FP8 and the GPU switches. Decided once (`layer_choices`) and handed down."""

    fp8: Fp8Plan
    gpu: GpuSwitches
    use_te: bool


def layer_choices(cfg, use_te: Optional[bool] = None, layout: Optional[RunLayout] = None) -> LayerChoices:
    """The FP8 plan and GPU switches of a resolved recipe on this machine; use_te=None means
    `model.transformer_impl`'s choice (models/specs.use_transformer_engine). `layout`: the
    run's layout, whose input streams give the FP8 plan its token counts (the recipe's own
    streams when None: a stand-alone block config)."""
    if use_te is None:
        use_te = use_transformer_engine(cfg.model.transformer_impl)
    streams = layout.streams if layout is not None else None
    return LayerChoices(fp8=fp8_plan(cfg, streams), gpu=gpu_switches(cfg, use_te), use_te=bool(use_te))


def tower_config(cfg, tower: Tower, choices: Optional[LayerChoices] = None,
                 layout: Optional[RunLayout] = None) -> TransformerConfig:
    """The TransformerConfig of one tower (sizes from the resolved recipe); `choices` from
    `layer_choices` (computed here when None). `layout` gives megatron the tower's share of
    each pipeline stage (`RunLayout.tower_layout`); None only for a single stage."""
    if layout is None and cfg.parallel.pipeline_parallel > 1:
        raise ValueError(f"tower_config: parallel.pipeline_parallel={cfg.parallel.pipeline_parallel} needs the "
                         "run's RunLayout (tulip_mega.launch.resolve_layout) for the pipeline split")
    t = cfg.model.vision if tower == "vision" else cfg.model.text
    return _transformer_config(
        cfg, t, tower, choices or layer_choices(cfg, layout=layout), pipeline_parallel=cfg.parallel.pipeline_parallel,
        recompute=True, layout=layout.tower_layout(tower) if layout is not None else None,
    )


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


def decoder_config(cfg, which: DecoderName, choices: Optional[LayerChoices] = None) -> TransformerConfig:
    """The TransformerConfig of a decoder on the last stage ('mae' pixels, 'text' caption, 'locca').

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
    decoders = {"mae": cfg.model.mae_decoder, "text": cfg.model.text_decoder, "locca": cfg.model.locca_decoder}
    if which not in decoders:
        raise ValueError(f"decoder_config: which={which!r}; expected 'mae', 'text' or 'locca'")
    dec = decoders[which]
    unset = [k for k in ("hidden_size", "num_heads", "ffn_hidden_size") if getattr(dec, k) is None]
    if unset:
        raise ValueError(f"model.{which}_decoder.{unset[0]} is unset: pass a config resolved by load_config")
    return _transformer_config(cfg, dec, f"{which}_decoder", choices or layer_choices(cfg), pipeline_parallel=1,
                               recompute=False)


def recompute_granularity(cfg, t, choices: LayerChoices, recompute: bool) -> Optional[str]:
    """`recompute.granularity` for a block of sizes `t`, or None when nothing is left to recompute.

    Selective recompute re-runs core attention only (megatron's default `recompute_modules`),
    to avoid storing the [b, heads, s, s] scores. TE's fused attention backends (flash
    attention, cuDNN) store none, so there it only costs time: dropped where TE can use them,
    head dims that are multiples of 8 up to 128 (TE's dot_product_attention/utils.py backend
    filters; other head dims may fall back to TE's unfused attention, which does store them)."""
    if not recompute:
        return None
    granularity = cfg.recompute.granularity
    head_dim = t.hidden_size // t.num_heads
    if granularity == "selective" and choices.gpu.drop_core_attn_recompute and fused_attention_head_dim(head_dim):
        return None
    return granularity


def fused_attention_head_dim(head_dim: int) -> bool:
    """Whether TE's fused attention backends take this head dim on every GPU TE supports."""
    return head_dim % 8 == 0 and head_dim <= 128


def amax_reduction(choices: LayerChoices) -> dict:
    """FP8 amax reduction (delayed scaling): over the TP group only.

    megatron enters one `fp8_autocast` per TransformerBlock call (transformer_block.py), and TE
    reduces the amaxes of that region and updates the scales at its exit, and again in the
    backward of its first module (fp8.py `reduce_and_update_fp8_tensors`), over megatron's
    amax group: TP x DP by default, one cross-node all-reduce per block call and direction.
    TE has no once-per-step setting short of one autocast around the whole step, which would
    also put the blocks that must run bf16 into FP8. TP ranks must share scales (sequence
    parallel gathers FP8 activations); data-parallel replicas need not: their weights stay
    identical (gradients are averaged) and only their activation scales differ slightly. So
    the group is TP only (`tp_only_amax_red`, an NVLink all-reduce; none at TP 1). The scales
    still update at every block call, as before. Checkpoints keep data-parallel rank 0's
    amax history, which every replica resumes from."""
    return {"tp_only_amax_red": True} if choices.gpu.tp_only_amax_reduction else {}


def fp8_settings(cfg, block: str, choices: LayerChoices) -> dict:
    """The TransformerConfig FP8 keys of `block`: the recipe's FP8 settings where the FP8
    plan runs the block in FP8, none (bf16) elsewhere."""
    if not choices.fp8.runs_fp8(block):
        return {}
    p = cfg.precision
    return dict(fp8=p.fp8, fp8_recipe=p.fp8_recipe, fp8_amax_history_len=p.fp8_amax_history_len,
                fp8_amax_compute_algo=p.fp8_amax_compute_algo, **amax_reduction(choices))


def wgrad_fusion(block: str, choices: LayerChoices) -> bool:
    """Fused weight-gradient accumulation, which needs it in every linear of the block: TE's
    for TE layers, apex's for megatron's own (local layers, the caption decoder's output)."""
    gpu = choices.gpu
    megatron_linears = not choices.use_te or block in ("text_decoder", "locca_decoder")
    return (gpu.wgrad_fusion_te or not choices.use_te) and (gpu.wgrad_fusion_megatron or not megatron_linears)


def _transformer_config(cfg, t, block: str, choices: LayerChoices, pipeline_parallel: int, recompute: bool,
                        layout=None) -> TransformerConfig:
    """A TransformerConfig with the sizes of `t` (num_layers, hidden_size, num_heads,
    ffn_hidden_size) for `block` (vision, text, mae_decoder, text_decoder) and everything else
    from the recipe and `choices`."""
    dtype = params_dtype(cfg)
    cuda = use_cuda()
    rc, gpu = cfg.recompute, choices.gpu
    granularity = recompute_granularity(cfg, t, choices, recompute)
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
        **fp8_settings(cfg, block, choices),
        # SigLIP architecture
        normalization="LayerNorm",
        layernorm_epsilon=cfg.model.layernorm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        # megatron's fused bias-GELU is keyed on F.gelu and computes the tanh approximation.
        activation_func=F.gelu if gpu.bias_gelu_fusion else gelu_tanh,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        # GPU-only fusions (`GpuSwitches`); the unfused paths compute the same thing.
        bias_activation_fusion=gpu.bias_gelu_fusion,
        masked_softmax_fusion=False,
        bias_dropout_fusion=gpu.bias_dropout_fusion,
        gradient_accumulation_fusion=wgrad_fusion(block, choices),
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


# megatron-core 0.16.1's DDP default is max(40M, 1M x DP) parameters per bucket: at DP 256 a
# 0.8B-parameter rank gets about 3 buckets, and the last one (the first layers' gradients,
# ready last) is reduced after the backward pass with nothing left to overlap. We aim for
# DDP_BUCKETS buckets (about 1/8 of the reduction exposed) but keep each rank's share of a
# bucket at MIN_BUCKET_SHARE parameters (1 MB of fp32 gradients) so the collectives stay
# bandwidth-bound, and never exceed megatron's default.
DDP_BUCKETS = 8
MIN_BUCKET_SHARE = 250_000


def bucket_size_for(params: int, dp: int) -> int:
    """DDP bucket size (parameters) for a model chunk of `params` parameters at DP `dp`."""
    megatron_default = max(40_000_000, 1_000_000 * dp)
    return min(megatron_default, max(math.ceil(params / DDP_BUCKETS), MIN_BUCKET_SHARE * dp))


def ddp_bucket_size(cfg, parts: list[torch.nn.Module]) -> Optional[int]:
    """`DistributedDataParallelConfig.bucket_size` for this rank's model parts (one per virtual
    stage): `bucket_size_for` its largest part on a GPU with `parallel.overlap_grad_reduce`;
    None (megatron's default, one bucket without overlap) otherwise."""
    if not use_cuda() or not cfg.parallel.overlap_grad_reduce:
        return None
    params = max(sum(p.numel() for p in m.parameters() if p.requires_grad) for m in parts)
    return bucket_size_for(params, parallel_state.get_data_parallel_world_size())


def startup_lines(cfg, choices: LayerChoices, bucket_size: Optional[int]) -> list[str]:
    """What `layer_choices` decided, for the start-up log: FP8 per block, the GPU switches,
    recompute dropped under TE attention, and the DDP bucket (`bucket_size` as megatron's DDP
    holds it: None = one bucket)."""
    gpu = choices.gpu
    lines = [choices.fp8.startup_line()]
    if not gpu.cuda:
        lines.append("GPU switches: off (no CUDA): no gradient accumulation, bias-GELU or bias-dropout-add fusion")
        return lines
    wgrad = " and ".join(name for name, on in (("TE layers", gpu.wgrad_fusion_te),
                                               ("megatron's linears (apex)", gpu.wgrad_fusion_megatron)) if on)
    if gpu.wgrad_fusion_te and not gpu.wgrad_fusion_megatron:
        wgrad += " (not in blocks with megatron's own linears, e.g. the caption decoder: no apex)"
    switches = [f"gradient accumulation fusion {'in ' + wgrad if wgrad else 'off (no TE layers, no apex)'}",
                f"bias-GELU fusion {'on' if gpu.bias_gelu_fusion else 'off'}",
                f"bias-dropout-add fusion {'on' if gpu.bias_dropout_fusion else 'off'}"]
    if cfg.precision.fp8 is not None:
        switches.append("FP8 amax reduction over " + ("TP only" if gpu.tp_only_amax_reduction else "TP x DP"))
    lines.append("GPU switches: " + ", ".join(switches))
    if cfg.recompute.granularity == "selective":
        towers = {"vision": cfg.model.vision, "text": cfg.model.text}
        dropped = [f"{name} (head dim {t.hidden_size // t.num_heads})" for name, t in towers.items()
                   if recompute_granularity(cfg, t, choices, True) is None]
        if dropped:
            lines.append(f"recompute: selective core-attention recompute dropped for {', '.join(dropped)}: "
                         "TE's fused attention stores no score matrix")
    lines.append(f"DDP buckets: {bucket_size / 1e6:.1f}M parameters each (overlap_grad_reduce)" if bucket_size
                 else "DDP buckets: one per model chunk (parallel.overlap_grad_reduce=false)")
    return lines
