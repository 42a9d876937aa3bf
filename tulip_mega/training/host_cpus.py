"""Whether a rank has the CPU cores its loader keeps busy: one start-up line, a warning if not.

A rank runs its training thread and, with the DALI loader, DALI's CPU threads (data.threads),
the reader worker processes (data.reader_workers) and the prefetch thread (data.prefetch > 0).
On GPUs `tulip-mega plan` also says how many cores the host path needs to keep up with the
GPU at the plan's MFU (tulip_mega/data_rate.py); the larger of that and data.reader_workers
counts. The rank's CPU affinity (`os.sched_getaffinity`: what SLURM's --cpus-per-task and
--cpu-bind give it) below that number means the loader's threads share cores and the GPU
waits; slurm/common.sh sizes --cpus-per-task from the node, and this check is the one place
that compares the two, whatever launched the rank.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Optional

from tulip_mega.config import Config
from tulip_mega.config.run_layout import RunLayout

log = logging.getLogger("tulip_mega")


def tasks_per_node(environ: Optional[dict] = None) -> int:
    """Ranks on this node, from the launcher (torchrun's LOCAL_WORLD_SIZE, SLURM's task
    counts "8(x64)"); 1 when unknown."""
    env = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        m = re.match(r"\d+", env.get(key, ""))
        if m and int(m.group()) > 0:
            return int(m.group())
    return 1


def plan_host_cores(cfg: Config, layout: RunLayout, gpus_per_node: int) -> Optional[int]:
    """Cores the host path needs per loading rank at `tulip-mega plan`'s defaults on this
    layout (data rate / host samples per core, each worker counted at HOST_CORE_SHARE of a
    core), planned on whole nodes of `gpus_per_node`; None when the plan cannot be made."""
    from tulip_mega.config import ConfigError
    from tulip_mega.data_rate import HOST_CORE_SHARE, data_rate
    from tulip_mega.launch import resolve_layout
    from tulip_mega.plan import plan_layout

    world = layout.world_size
    gpus = max(1, world // max(gpus_per_node, 1)) * min(gpus_per_node, world)
    try:
        planned = layout if gpus == world else resolve_layout(cfg, gpus)
        rate = data_rate(cfg, plan_layout(cfg, planned))
    except (ConfigError, ValueError, ZeroDivisionError):
        return None
    return math.ceil(rate.host_cores / HOST_CORE_SHARE)


def cores_needed(cfg: Config, dali: bool, plan_cores: Optional[int]) -> int:
    """Cores one rank keeps busy: its training thread, and with DALI: data.threads, the host
    path (the larger of data.reader_workers and the plan's figure) and the prefetch thread."""
    if not dali:
        return 1
    d = cfg.data
    return 1 + d.threads + max(d.reader_workers, plan_cores or 0) + (1 if d.prefetch > 0 else 0)


def host_cpu_report(cfg: Config, affinity: int, dali: bool, plan_cores: Optional[int],
                    omp_threads: str, torch_threads: int) -> tuple[str, Optional[str]]:
    """(start-up line, warning or None) for a rank with `affinity` cores."""
    need = cores_needed(cfg, dali, plan_cores)
    parts = "training thread" + (f" + data.threads {cfg.data.threads} + host path "
                                 f"{max(cfg.data.reader_workers, plan_cores or 0)} (data.reader_workers "
                                 f"{cfg.data.reader_workers}, plan {plan_cores if plan_cores is not None else 'n/a'})"
                                 f" + prefetch {1 if cfg.data.prefetch > 0 else 0}" if dali else "")
    line = (f"host cpus: {affinity} cores in this rank's affinity, OMP_NUM_THREADS={omp_threads}, torch threads "
            f"{torch_threads}; the rank keeps {need} busy ({parts})")
    if affinity >= need:
        return line, None
    return line, (f"this rank may use {affinity} CPU cores but keeps {need} busy (above): the loader will share "
                  "cores and the GPU may wait for data. Give each task more cores (sbatch --cpus-per-task; "
                  "slurm/common.sh derives it from the node) or lower data.threads / data.reader_workers")


def log_host_cpus(cfg: Config, layout: RunLayout, rank: int, loader: Any, cuda: bool) -> None:
    """Rank 0 logs the start-up line, and the warning when its affinity is short (every task
    gets the same --cpus-per-task). The plan's host-path figure counts on GPUs only: it is the
    rate an H100 at the plan's MFU asks for."""
    if rank != 0:
        return
    import torch

    dali = type(loader).__name__.startswith("Dali")
    plan_cores = plan_host_cores(cfg, layout, tasks_per_node()) if cuda and dali else None
    line, warning = host_cpu_report(cfg, len(os.sched_getaffinity(0)), dali, plan_cores,
                                    os.environ.get("OMP_NUM_THREADS", "unset"), torch.get_num_threads())
    log.info("%s", line)
    if warning:
        log.warning("%s", warning)
