"""`tulip-mega reshard CHECKPOINT --tp T --pp P [--virtual V] OUT`: a checkpoint rewritten for another layout.

Why this is short: the torch_dist format stores every tensor under its global key with its
global shape, so a checkpoint is not tied to the TP x PP that wrote it, and the trainer
already loads one under another layout (`checkpoint.load=CKPT` with new parallel sizes:
model and optimizer state are resliced, the RNG states, which are per rank, are dropped and
the run's seeds used; the loader position is dropped if the data-parallel size changes).
So for *training* under a new layout, `checkpoint.load=` is enough and costs nothing.

This command does the same load once, on T x P local ranks (data-parallel size 1), and saves
the result to OUT/step_<N> (+ OUT/latest): model, optimizer and scheduler state carried over,
the recorded layout and per-rank RNG states being the new layout's. Use it to check in
advance that a checkpoint loads under the new layout, or to hand someone a checkpoint whose
metadata says the layout it will be resumed with. Interleaved virtual stages are one more
layout (`--virtual V`, `parallel.virtual_pipeline`): a checkpoint groups its model state per
chunk (`model0`, `model1`, ...) but keys every tensor globally, so it converts to and from
any other PP, split and virtual size the same way. Run under torchrun (WORLD_SIZE = T x P)
it uses those processes; otherwise it spawns T x P gloo processes on this machine.

Any machine reshards (`reader_overrides`, `match_checkpoint_names` in training/checkpoint.py):
without CUDA the optimizer is megatron's plain one (an optimizer state written by the
DistributedOptimizer is refused with a message: its flattened format needs a GPU node), and
without Transformer Engine the layers are local and read a TE run's names (models/te_names.py).
The output carries the names of the layers that resharded it: a TE checkpoint resharded without
TE comes out with local names and no `_extra_state`; TE layers resume it, with fresh FP8
scaling state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from tulip_mega.convert.common import ConversionError


def reshard_config(checkpoint: Path, tp: int, pp: int, overrides: Sequence[str] = (), virtual: int = 1):
    """The run's recipe (config.yaml beside the checkpoint when there is one) with the new layout."""
    from megatron.core import dist_checkpointing

    from tulip_mega.config import load_config
    from tulip_mega.training.checkpoint import reader_overrides

    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    mc = common.get("model_config") or {}
    if "vision" not in mc or "text" not in mc:
        raise ConversionError(f"{checkpoint} holds no model_config; was it saved by tulip-mega?")
    run_cfg = Path(checkpoint).resolve().parent.parent / "config.yaml"
    model_keys = [f"model.{tower}.{k}={v}" for tower in ("vision", "text") for k, v in mc[tower].items()]
    model_keys += reader_overrides(builds_optimizer=True)
    layout = [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}", f"parallel.virtual_pipeline={virtual}",
              "model.init_from_hf=null", "model.init_from_open_clip=null"]
    if tp == 1:
        layout.append("parallel.sequence_parallel=false")
    return load_config(str(run_cfg) if run_cfg.is_file() else None, model_keys + list(overrides) + layout)


def _reshard_worker(cfg, layout, checkpoint: str, out: str) -> str:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.models.build import build_model_chunks
    from tulip_mega.parallel.init import init_parallel
    from tulip_mega.training.checkpoint import load_checkpoint, model_shape, save_checkpoint
    from tulip_mega.training.optimizer import make_optimizer, make_scheduler
    from tulip_mega.training.step import wrap_ddp

    init_parallel(layout.tensor_parallel, layout.pipeline_parallel, cfg.run.seed,
                  virtual_pipeline=layout.virtual_pipeline)
    model = wrap_ddp(build_model_chunks(cfg, layout), cfg)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    restored = load_checkpoint(Path(checkpoint), model, optimizer, scheduler, None, model_shape(cfg))
    path = save_checkpoint(Path(out), restored["step"], model, optimizer, scheduler, None, model_shape(cfg),
                           keep_last=1)
    return str(path)


def reshard(checkpoint, tp: int, pp: int, out, overrides: Sequence[str] = (), timeout: float = 1800.0,
            virtual: int = 1) -> Path:
    """Load CHECKPOINT under TP=tp x PP=pp x `virtual` chunks per PP rank (DP=1) and save it
    under OUT; returns OUT/step_<N>."""
    from tulip_mega.launch import resolve_layout
    from tulip_mega.parallel.init import use_cuda
    from tulip_mega.training.checkpoint import distributed_optimizer_format

    checkpoint, out = Path(checkpoint), Path(out)
    sharding = distributed_optimizer_format(checkpoint)
    if sharding is not None and not use_cuda():
        raise ConversionError(
            f"{checkpoint}: its optimizer state was written by megatron's DistributedOptimizer ({sharding}), "
            "which runs only with CUDA; reshard it on a GPU node. Its weights read anywhere: tulip-mega eval, "
            "tulip-mega convert")
    cfg = reshard_config(checkpoint, tp, pp, overrides, virtual)
    world = tp * pp
    layout = resolve_layout(cfg, world)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:  # launched by torchrun/srun: these processes are the ranks
        if env_world != world:
            raise ConversionError(f"launched with WORLD_SIZE={env_world}, but --tp {tp} x --pp {pp} needs {world}")
        return Path(_reshard_worker(cfg, layout, str(checkpoint), str(out)))
    from tulip_mega.parallel.spawn import run_distributed

    return Path(run_distributed(_reshard_worker, world, cfg, layout, str(checkpoint), str(out), timeout=timeout)[0])


def main(checkpoint: str, tp: int, pp: int, out: str, overrides: Optional[Sequence[str]] = None,
         virtual: int = 1) -> int:
    from tulip_mega.training.checkpoint import reader_overrides

    path = reshard(checkpoint, tp, pp, out, overrides or (), virtual=virtual)
    chunks = f" x {virtual} virtual" if virtual > 1 else ""
    forced = reader_overrides(builds_optimizer=True)
    if forced:
        print(f"note: read on this machine with {' '.join(forced)} (no CUDA: megatron's plain optimizer; no "
              "Transformer Engine: local layers, checkpoint names mapped)")
    print(f"resharded {checkpoint} to TP={tp} x PP={pp}{chunks}: {path}")
    print(f"  continue training with: checkpoint.load={path} parallel.tensor_parallel={tp} "
          f"parallel.pipeline_parallel={pp}" + (f" parallel.virtual_pipeline={virtual}" if virtual > 1 else ""))
    return 0
