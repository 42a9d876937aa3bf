"""Start-up: resolve the recipe into a `RunLayout` once, with every check that can refuse it.

`resolve_layout` is the recipe arithmetic (sizes, micro-batches, contrastive batch, input
streams, pipeline split with its balanced search); `check_launch` adds what this machine
must support and is what `train`, `eval` and `reshard` call before any process group
exists, so a bad launch fails with numbers instead of a collective hang. `plan` calls
`resolve_layout` for a hypothetical world size. Pure Python at import (the machine checks
import torch when called), so `plan` stays instant.
"""

from __future__ import annotations

from tulip_mega.config import Config, validate_layout
from tulip_mega.config.run_layout import RunLayout
from tulip_mega.config.streams import contrastive_terms_on, distill_start_step, input_streams
from tulip_mega.models.pipeline_split import validate_split


def resolve_layout(cfg: Config, world_size: int) -> RunLayout:
    """The run's layout for `world_size` processes; raises ConfigError naming the recipe key
    that cannot run (batch arithmetic, interleaving, pipeline split)."""
    return _resolve(cfg, world_size, validate_layout(cfg, world_size))


def check_launch(cfg: Config, world_size: int) -> RunLayout:
    """`resolve_layout` plus what this machine's device and layer implementation must
    support (ZeRO-1 and FP8 need CUDA / Transformer Engine). The batch arithmetic is checked
    first: its message names the launch that cannot work anywhere."""
    from tulip_mega.models.specs import check_layer_support
    from tulip_mega.parallel.init import check_runtime_support

    dp = validate_layout(cfg, world_size)
    check_runtime_support(cfg)
    check_layer_support(cfg.model, cfg.precision)
    return _resolve(cfg, world_size, dp)


def _resolve(cfg: Config, world_size: int, dp: int) -> RunLayout:
    """The layout once the batch arithmetic has given the data-parallel size `dp`."""
    tr, par = cfg.train, cfg.parallel
    microbatches = tr.global_batch_size // (tr.micro_batch_size * dp)
    streams = input_streams(cfg)
    global_batch = cfg.loss.contrastive_batch == "global"
    return RunLayout(
        world_size=world_size,
        tensor_parallel=par.tensor_parallel,
        pipeline_parallel=par.pipeline_parallel,
        virtual_pipeline=par.virtual_pipeline,
        data_parallel=dp,
        micro_batch_size=tr.micro_batch_size,
        global_batch_size=tr.global_batch_size,
        microbatches=microbatches,
        contrastive_batch=tr.global_batch_size if global_batch else tr.micro_batch_size * dp,
        embedding_cache=global_batch and microbatches > 1 and bool(contrastive_terms_on(cfg)),
        streams=streams,
        split=validate_split(cfg, streams),
        distill_start=distill_start_step(cfg),
    )
