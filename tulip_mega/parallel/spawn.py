"""Run a function in N local processes joined by a gloo process group.

Used by the multi-process tests and the benchmarks: every rank runs `fn(*args)` after
`torch.distributed` is initialised; the per-rank return values come back to the caller as a
list indexed by rank. A failure on any rank raises in the caller with that rank's traceback,
and a hang is turned into an error after `timeout` seconds instead of blocking CI forever.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, backend: str = "gloo") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(*args)
        # Serialise with torch.save: tensors sent through the queue as shared memory would
        # vanish with this process before the parent reads them.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        parallel_state = sys.modules.get("megatron.core.parallel_state")  # never import it here
        if parallel_state is not None and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0,
                    backend: str = "gloo") -> list[Any]:
    """Run `fn(*args)` on `world_size` ranks (gloo; "nccl" puts rank r on GPU r, for
    benchmarks/gpu_acceptance.py); return the results ordered by rank.

    `fn` must be picklable (a module-level function). Raises RuntimeError naming the first
    failing rank and its traceback, or a TimeoutError when the ranks do not finish in time.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    # Not daemonic: megatron's checkpoint writer starts child processes, which daemons may not.
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, backend), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if errors or not any(p.is_alive() for p in procs):
                # A rank failed (the others are probably stuck in a collective) or all died.
                time.sleep(0.5)
                if queue.empty():
                    break
            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors[rank] = payload
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        # Every failing rank is reported: the first to fail is not always the lowest rank.
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"ranks {sorted(errors)} of {world_size} failed:\n{report}")
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s")
    return [results[r] for r in range(world_size)]
