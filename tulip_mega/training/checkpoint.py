"""Checkpoints with megatron `dist_checkpointing` (torch_dist format), saved atomically.

Layout of a checkpoint root:

    root/
      step_0000100/        complete checkpoints (dist_checkpointing directories)
      step_0000200/
      step_0000300.partial a save in progress (or one interrupted by a crash: ignored)
      latest               text file naming the newest complete checkpoint

A save writes into `<name>.partial`, and only after every rank finished does rank 0 rename
it and then replace `latest` (write + os.replace), so an interruption at any point leaves the
previous checkpoint usable. A checkpoint holds model, optimizer, LR scheduler, step, the RNG
states of every rank and each data-parallel rank's loader position; the resolved model
config is stored beside them so loading a checkpoint of another model shape fails with a
message naming the differing keys instead of a tensor-shape error.

Checkpoints are read under their own layer names: one written by Transformer Engine layers
(fused LayerNorm names, `_extra_state`) loads into local layers and the other way round, model
and optimizer state alike, through the mapping in models/te_names.py (`match_checkpoint_names`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from tulip_mega.models.te_names import checkpoint_key, is_extra_state, naming
from tulip_mega.parallel.init import use_cuda

log = logging.getLogger(__name__)

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run; the message says why."""


def model_shape(cfg) -> dict:
    """The checkpoint fingerprint: the architecture keys a checkpoint must match on load (and
    that conversion reads back). Saved in the checkpoint's common state as `model_config`."""
    return {
        "vision": dataclasses.asdict(cfg.model.vision),
        "text": dataclasses.asdict(cfg.model.text),
        "layernorm_eps": cfg.model.layernorm_eps,
    }


def _rank0() -> bool:
    return dist.get_rank() == 0


def _step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def read_latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None when there is none yet."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise CheckpointError(f"{marker} names {path}, which is not a complete checkpoint")
    return path


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if use_cuda() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and use_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> tuple[tuple[int, ...], tuple[int, int, int]]:
    """(PP, TP, DP[, virtual]) and this rank's (pp, tp, dp) ranks. The virtual size is recorded
    only when interleaving (a rank's RNG state belongs to its layout, chunks included)."""
    ps = parallel_state
    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    virtual = ps.get_virtual_pipeline_model_parallel_world_size()
    if virtual is not None and virtual > 1:
        shape = shape + (virtual,)
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return shape, offset


def _unwrap(model):
    """The TulipModel inside megatron's DDP wrapper: checkpoint keys carry no 'module.' prefix."""
    return getattr(model, "module", model)


def _state_names(parts: list) -> list[str]:
    """megatron's names for the model parts' states: `model` for one part, `model<i>` per part
    under interleaved virtual stages."""
    return ["model"] if len(parts) == 1 else [f"model{i}" for i in range(len(parts))]


def _model_states(parts: list) -> dict[str, dict]:
    """The model parts' sharded states under megatron's names (`_state_names`). Only the grouping
    differs: every tensor is stored under its global key (layers numbered globally by megatron
    from each part's layout offset), so the files are the same for any PP x virtual layout."""
    return {name: _unwrap(m).sharded_state_dict() for name, m in zip(_state_names(parts), parts)}


def checkpoint_keys(path: Path) -> set[str]:
    """Every tensor and object key a checkpoint holds (read from its metadata, no data)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {item.key for item in load_sharded_metadata(str(path)).values()}


def match_checkpoint_names(models: dict[str, dict], available: set[str], path: Path) -> dict[str, dict]:
    """Rename, in place, the model's sharded state (`_model_states`) to the layer names of a
    checkpoint holding the keys `available`: TE and local names map both ways (te_names.py), so
    the optimizer state built from it is read under the checkpoint's names too. `_extra_state`
    entries the checkpoint lacks (local checkpoint, TE layers) are taken out of the request and
    returned as {chunk: {state-dict key: the module's own value}} to be put back after loading
    (TE's final norm from a local checkpoint); those the checkpoint has and the model lacks are
    not read, and a local linear ignores the one it reads. Raises naming the model
    keys the checkpoint has under neither name."""
    ours = naming(k for state in models.values() for k in _keys(state))
    own: dict[str, dict] = {}
    missing = []
    for chunk, state in models.items():
        for name, item in list(state.items()):
            if isinstance(item, ShardedObject) and is_extra_state(item.key):
                if item.key not in available:
                    own.setdefault(chunk, {})[name] = item.data
                    del state[name]
            elif isinstance(item, ShardedTensor):
                item.key = checkpoint_key(item.key, available)
                if item.key not in available:
                    missing.append(item.key)
    if missing:
        raise CheckpointError(f"checkpoint {path} has no tensor for model key(s) {sorted(set(missing))[:8]} "
                              "(under local or Transformer Engine names)")
    theirs = naming(available)
    if theirs != ours:
        log.info("checkpoint %s has %s layer names; loaded into %s layers (names mapped, Transformer Engine "
                 "FP8 state %s)", path, theirs, ours, "dropped" if theirs == "te" else "left to the layers")
    return own


def _keys(state: dict) -> list[str]:
    return [item.key for item in state.values() if isinstance(item, (ShardedTensor, ShardedObject))]


def restore_own_extra_state(loaded: dict, own: dict[str, dict]) -> None:
    """Put back the `_extra_state` values the checkpoint did not have (see match_checkpoint_names)."""
    for chunk, values in own.items():
        loaded[chunk].update(values)


def _sharded_state(models: dict[str, dict], optimizer, scheduler, loader_state: Optional[dict], extra: dict,
                   is_loading: bool) -> dict:
    """The state dict of a checkpoint around the model's sharded state `models`
    (`_model_states`); the optimizer's entries take their keys from it."""
    shape, offset = _layout()
    state: dict[str, Any] = {
        **models,
        # The optimizer finds each parameter's key in the model state, whatever the grouping.
        "optimizer": optimizer.sharded_state_dict(models if len(models) > 1 else models["model"],
                                                  is_loading=is_loading),
        "scheduler": scheduler.state_dict(),
        "rng": ShardedObject("rng_state", _rng_state(), shape[:3], offset, replica_id=0),
        **extra,
    }
    if loader_state is not None:
        # One loader position per data-parallel rank; TP/PP ranks of that DP rank are replicas.
        pp, tp, dp = offset
        state["loader"] = ShardedObject(
            "loader_state", loader_state, (shape[2],), (dp,), replica_id=(pp, tp)
        )
    return state


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    loader_state: Optional[dict],
    model_config: dict,
    keep_last: int = 2,
    async_queue=None,
) -> Path:
    """Save collectively (every rank calls this); returns the published checkpoint path.

    With `async_queue` (a megatron AsyncCallsQueue) the tensors are written in the background
    and the returned path is published only when the queue finalises the request."""
    root = Path(root)
    final = root / _step_dir_name(step)
    partial = root / (final.name + ".partial")
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by an interrupted save
            shutil.rmtree(partial)
        partial.mkdir()
    dist.barrier()
    extra = {"step": step, "model_config": model_config, "layout": list(_layout()[0])}
    state = _sharded_state(_model_states(model), optimizer, scheduler, loader_state, extra, False)
    if async_queue is not None:
        # The write runs in a background process (training/async_checkpoint.py); the publish
        # below runs as the request's finalisation, on every rank, after every rank's write.
        request = dist_checkpointing.save(state, str(partial), async_sharded_save=True)
        request.add_finalize_fn(lambda: _publish(root, partial, final, keep_last))
        async_queue.schedule_async_request(request)
        return final
    dist_checkpointing.save(state, str(partial))
    _publish(root, partial, final, keep_last)
    return final


def _publish(root: Path, partial: Path, final: Path, keep_last: int) -> None:
    """Collective: once every rank has written `partial`, rank 0 renames it to `final` and then
    points `latest` at it (write + os.replace), so a crash at any point keeps the previous one."""
    dist.barrier()
    if _rank0():
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        os.replace(tmp, root / LATEST)
        _prune(root, keep_last)
    dist.barrier()


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, loader_state: Optional[dict], model_config: dict) -> dict:
    """Load a checkpoint into this run's (possibly differently laid out) model and optimizer.

    Returns {"step": int, "loader": dict | None}. RNG states are restored when the layout is
    the one that saved them; after a layout change the run's own seeds are kept. A checkpoint of
    the other layer implementation (Transformer Engine vs local) loads too: see
    `match_checkpoint_names`.
    """
    path = Path(path)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise CheckpointError(f"{path} is not a dist_checkpointing checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(path))
    check_model_config(path, common.get("model_config", {}), model_config)
    saved_layout = common.get("layout")
    shape, _ = _layout()
    same_layout = saved_layout is None or tuple(saved_layout) == shape
    models = _model_states(model)
    own = match_checkpoint_names(models, checkpoint_keys(path), path)
    state = _sharded_state(models, optimizer, scheduler, loader_state, {}, is_loading=True)
    if not same_layout:
        state.pop("rng")
        if saved_layout[2] != shape[2]:
            state.pop("loader", None)  # the loader position is per data-parallel rank
    loaded = dist_checkpointing.load(state, str(path))
    restore_own_extra_state(loaded, own)
    for name, part in zip(_state_names(model), model):
        _unwrap(part).load_state_dict(loaded[name])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    return {"step": int(common["step"]), "loader": loaded.get("loader")}


def reader_overrides(builds_optimizer: bool) -> list[str]:
    """Recipe overrides under which eval and reshard read any run's checkpoint on this machine.

    megatron's DistributedOptimizer takes CUDA parameters only, so it is off without CUDA (and
    always when no optimizer is built: eval); FP8 and `model.transformer_impl: te` need
    Transformer Engine, so where it does not import the layers are local and FP8 off (the
    checkpoint's TE names are mapped on load, `match_checkpoint_names`)."""
    from tulip_mega.models.specs import overrides_where_te_absent

    out = []
    if not builds_optimizer or not use_cuda():
        out.append("parallel.distributed_optimizer=false")
    return out + overrides_where_te_absent()


def distributed_optimizer_format(path: Path) -> Optional[str]:
    """The sharding type of an optimizer state written by megatron's DistributedOptimizer
    (e.g. 'fully_sharded_model_space'), or None for the plain optimizer's model-space format."""
    def find(tree) -> Optional[str]:
        if isinstance(tree, dict):
            if "param_state_sharding_type" in tree:
                return tree["param_state_sharding_type"]
            return next((t for t in map(find, tree.values()) if t is not None), None)
        return None

    return find(dist_checkpointing.load_common_state_dict(str(path)).get("optimizer"))


def check_model_config(path: Path, saved: dict, current: dict) -> None:
    diffs = _diff(saved, current)
    if diffs:
        lines = "\n".join(f"  model.{k}: checkpoint has {a!r}, this run has {b!r}" for k, a, b in diffs)
        raise CheckpointError(f"checkpoint {path} was saved from a different model shape:\n{lines}")


def _diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append((f"{prefix}{k}", va, vb))
    return out
