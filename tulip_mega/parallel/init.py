"""Process-group set-up from torchrun or SLURM, and the one GPU-vs-CPU decision.

Every device fact is decided here and nowhere else: `use_cuda()` (GPU or CPU), `device()`,
the process-group backend (NCCL or gloo, in `init_parallel`) and `compute_dtype()` (what
`precision.dtype: auto` means on this machine). A test (tests/unit/test_structure.py) fails when
another module calls `torch.cuda.is_available()`.

`launch_env()` reads rank/world/master from torchrun's variables, or from SLURM's when the
job was started by a plain `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first
host of SLURM_JOB_NODELIST), or falls back to a single process. `init_parallel()` creates
the default process group (NCCL with CUDA, gloo without), applies the CPU compatibility
patches when CUDA is absent, and initialises megatron-core's tensor/pipeline/data groups.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Mapping, Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM nodelist such as 'gpu[001-004,010],cpu7' -> 'gpu001'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from torchrun, SLURM, or a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR", first_slurm_host(nodelist)),
            # One port per job so two jobs sharing a node do not collide.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


def use_cuda() -> bool:
    """The single GPU-vs-CPU decision: CUDA when a device is visible."""
    return torch.cuda.is_available()


def compute_dtype(name: str) -> str:
    """The `precision.dtype` rule: 'auto' is bf16 on a GPU and fp32 on a CPU; 'bf16' and
    'fp32' stay as they are."""
    if name == "auto":
        return "bf16" if use_cuda() else "fp32"
    return name


def device() -> torch.device:
    """The device this rank computes on."""
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(
    tensor_parallel: int,
    pipeline_parallel: int,
    seed: int,
    env: Optional[LaunchEnv] = None,
    timeout_minutes: float = 30.0,
    virtual_pipeline: int = 1,
) -> LaunchEnv:
    """Create the default process group (if not yet there) and megatron's model-parallel groups.

    `virtual_pipeline` > 1 (`parallel.virtual_pipeline`) records the interleaved virtual size in
    megatron's parallel state, which is what makes `get_forward_backward_func()` return the
    interleaved schedule; 1 leaves it unset (megatron's non-interleaved default).

    Seeds the model-parallel RNG tracker so TP ranks share (or differ in) dropout masks the
    way megatron expects.
    """
    from megatron.core import parallel_state, tensor_parallel as mtp

    from tulip_mega.parallel import cpu_compat

    env = env or launch_env()
    if use_cuda():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend="nccl" if use_cuda() else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    cpu_compat.apply()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
    )
    torch.manual_seed(seed)
    mtp.model_parallel_cuda_manual_seed(seed)
    return env


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default group (tests call this between runs)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def check_runtime_support(cfg) -> None:
    """Recipe settings this machine's device cannot run, refused before any process group exists.

    megatron's DistributedOptimizer only accepts 'torch.cuda.*Tensor' parameters, so ZeRO-1
    needs CUDA; the CPU path uses the plain (replicated) optimizer instead. What the layer
    implementation needs (Transformer Engine for FP8 or `model.transformer_impl: te`) is
    checked next to that decision, by `tulip_mega.models.specs.check_layer_support`.
    """
    from tulip_mega.config import ConfigError

    if cfg.parallel.distributed_optimizer and not use_cuda():
        raise ConfigError(
            "parallel.distributed_optimizer=true needs CUDA (megatron's DistributedOptimizer only "
            "accepts CUDA parameters); set parallel.distributed_optimizer=false on a CPU machine"
        )
