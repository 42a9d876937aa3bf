"""Peak memory and time per rank of DistributedSigmoidLoss forward+backward versus the DP size.

Why: the point of the ring implementation is that per-rank memory depends on the LOCAL batch
only, so the global batch can grow with the DP size. This script checks that claim with
measured numbers: at a fixed local batch it runs forward+backward for DP = 1, 2, 4 with both
impls ("ring", "gather") on CPU/gloo, and the dense single-process loss at the same global
batch for comparison. Expected shape of the result:
  * ring: ~constant across DP (one [B_local, B_local] block of logits at a time, plus a few
    [B_local, D] text blocks / gradient accumulators in flight);
  * gather: grows with the gathered [B_global, D] texts and the [B_local, B_global] local-rows
    logits that autograd keeps, i.e. linearly in DP, never B_global^2;
  * dense at the global batch: grows with B_global^2.

How memory is measured (per rank, CPU): the kernel's peak resident set size. Just before the
measured forward+backward, a rank calls malloc_trim(0) (so heap memory freed by the warm-up is
handed back to the OS instead of sitting resident and being silently reused, which would hide
allocations), then writes "5" to /proc/self/clear_refs, which resets VmHWM (peak RSS) to the
current RSS. After the step it reads VmHWM from /proc/self/status. Peak minus the RSS before the
step is everything the step touched: tensors, autograd-saved activations, gradients, P2P/
collective buffers, gloo internals. It is measured by the kernel rather than modelled from
tensor sizes, and PyTorch's CPU allocator has no cache that could keep freed blocks resident.
glibc's malloc would still keep freed blocks on its heap: its mmap threshold adapts upwards
after the first large free, so later [B, B] tensors come from the brk heap, whose fragmentation
depends on the allocation history (with the default glibc behaviour the ring numbers drift up
with the number of ring steps, e.g. 32/46/68 MiB at DP 1/2/4 for B_local=1024, D=512, while
the live tensors stay ~constant). So the script starts its ranks with MALLOC_MMAP_THRESHOLD_
=131072 (unless already set in the environment): every allocation over 128 KiB is its own
mmap, released on free, and the peak RSS tracks the live tensors. This costs page faults, so
the times are somewhat pessimistic.
The inputs live in the baseline; the gradients they receive count in the peak. A warm-up step
runs first (thread pools, gloo buffers, lazy initialisation). The reported value is the
maximum over ranks of the maximum over repeats. Each configuration runs in fresh processes
(run_distributed), except with --quick, where one set of processes per world size runs all of
its configurations to save spawn time (the sizes there are too small to measure much anyway).
If /proc/self/clear_refs cannot be written (non-Linux, restricted container) the fallback is
ru_maxrss (peak RSS since process start) minus the RSS before the step, which is only a lower
bound when imports peaked higher; the output says which method ran.

Time: median over repeats of the slowest rank's forward+backward (a barrier before each
repeat). On a machine with fewer cores than ranks the ranks share cores, so time ratios are
indicative only; nothing here asserts on time.

Usage: python benchmarks/loss_memory.py [--quick] [--batch 1024] [--dim 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for `python benchmarks/...`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.peak_memory import peak_since, reset_peak  # noqa: E402
from tulip_mega.losses import DistributedSigmoidLoss, sigmoid_loss  # noqa: E402
from tulip_mega.parallel.spawn import run_distributed  # noqa: E402

MIB = 1024.0 * 1024.0
DP_SIZES = (1, 2, 4)  # default; --dp-sizes overrides (the first one is the ratio baseline)


# --------------------------------------------------------------------------------------------
# Per-process measurement
# --------------------------------------------------------------------------------------------


def _inputs(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    return x, y, scale, bias


def _measure(step, inputs: tuple[torch.Tensor, ...], repeats: int, distributed: bool) -> dict[str, Any]:
    def run_once() -> None:
        for t in inputs:
            t.grad = None
        step(*inputs).backward()

    run_once()  # warm-up
    for t in inputs:
        t.grad = None
    peaks, times = [], []
    method = "?"
    for _ in range(repeats):
        if distributed:
            dist.barrier()
        method, before = reset_peak()
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
        peaks.append(float(peak_since(method, before)))
        for t in inputs:
            t.grad = None
    return {"peak_bytes": max(peaks), "times": times, "method": method}


def _bench_worker(configs: list[tuple[str, int]], batch: int, dim: int, repeats: int) -> dict:
    """Runs on every rank of a fresh process group; returns {config: measurement}."""
    rank = dist.get_rank()
    results = {}
    for impl, dp in configs:
        if impl == "dense":  # single process, global batch dp * batch
            x, y, s, b = _inputs(dp * batch, dim, seed=0)
            results[(impl, dp)] = _measure(sigmoid_loss, (x, y, s, b), repeats, distributed=False)
        else:
            assert dist.get_world_size() == dp
            loss = DistributedSigmoidLoss(impl=impl)
            x, y, s, b = _inputs(batch, dim, seed=1 + rank)
            results[(impl, dp)] = _measure(loss, (x, y, s, b), repeats, distributed=True)
    return results


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _run(configs: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    """{config: (peak bytes max over ranks, median over repeats of the slowest rank, method)}."""
    groups: dict[int, list[tuple[str, int]]] = {}
    for impl, dp in configs:
        world = 1 if impl == "dense" else dp
        groups.setdefault(world, []).append((impl, dp))
    jobs = [(w, cs) for w, cs in sorted(groups.items())] if args.quick else [
        (1 if impl == "dense" else dp, [(impl, dp)]) for impl, dp in configs
    ]
    out = {}
    for world, cs in jobs:
        per_rank = run_distributed(_bench_worker, world, cs, args.batch, args.dim, args.repeats)
        for cfg in cs:
            peak = max(r[cfg]["peak_bytes"] for r in per_rank)
            slowest = [max(r[cfg]["times"][i] for r in per_rank) for i in range(args.repeats)]
            out[cfg] = (peak, statistics.median(slowest), per_rank[0][cfg]["method"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, shared processes (<30 s)")
    parser.add_argument(
        "--batch", type=int, default=None, help="local batch per rank (default 1024; quick 128)"
    )
    parser.add_argument("--dim", type=int, default=None, help="embedding dim (default 512; quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats (default 3; quick 2)")
    parser.add_argument(
        "--dp-sizes", type=int, nargs="+", default=list(DP_SIZES), help="DP sizes (default 1 2 4)"
    )
    args = parser.parse_args(argv)
    args.batch = args.batch or (128 if args.quick else 1024)
    args.dim = args.dim or (32 if args.quick else 512)
    args.repeats = args.repeats or (2 if args.quick else 3)

    # Read by glibc at process start, so it reaches the spawned ranks (see the docstring).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    dps = sorted(set(args.dp_sizes))
    configs = [(impl, dp) for impl in ("ring", "gather", "dense") for dp in dps]
    t0 = time.time()
    res = _run(configs, args)
    methods = sorted({m for _, _, m in res.values()})

    block = args.batch * args.batch * 4 / MIB
    texts = args.batch * args.dim * 4 / MIB
    print(
        f"DistributedSigmoidLoss forward+backward, CPU/gloo, float32, B_local={args.batch}, "
        f"D={args.dim}, repeats={args.repeats}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(
        f"peak memory method: {', '.join(methods)} (peak RSS over the step minus RSS before it), "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}"
    )
    print(
        f"for scale: one [B_local, B_local] fp32 block = {block:.2f} MiB, "
        f"one [B_local, D] block = {texts:.2f} MiB"
    )
    print(
        "'dense' = single-process sigmoid_loss at the GLOBAL batch DP * B_local "
        "(what one rank would need without DP)"
    )
    print()
    header = f"{'impl':<8}{'DP':>4}{'B_global':>10}{'peak MiB/rank':>15}{'time ms':>10}"
    print(header)
    print("-" * len(header))
    for impl, dp in configs:
        peak, t, _ = res[(impl, dp)]
        print(f"{impl:<8}{dp:>4}{dp * args.batch:>10}{peak / MIB:>15.2f}{t * 1e3:>10.1f}")
    print()
    print(f"== ratios vs DP={dps[0]} (same impl) ==")
    header = f"{'impl':<8}{'DP':>4}{'memory x':>10}{'time x':>10}"
    print(header)
    print("-" * len(header))
    for impl, dp in configs:
        peak, t, _ = res[(impl, dp)]
        peak1, t1, _ = res[(impl, dps[0])]
        mem_ratio = peak / peak1 if peak1 > 0 else float("nan")
        print(f"{impl:<8}{dp:>4}{mem_ratio:>10.2f}{t / t1:>10.2f}")
    print()
    print(f"total wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
