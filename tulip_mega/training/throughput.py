"""Speed and health of a run: device peaks and MFU, peak memory, data-loader wait, stragglers.

MFU (model FLOPs utilisation) = achieved model FLOP/s per device / the device's dense peak,
with model FLOPs from tulip_mega.flops (3 x forward, recompute not counted). The
peak comes from a table of known GPUs, looked up by `torch.cuda.get_device_name()`; on a CPU
or an unknown GPU there is no trustworthy peak, so only TFLOP/s is reported (with a note).
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional

log = logging.getLogger("tulip_mega")

GIB = 1024**3

# Dense (no sparsity) 16-bit tensor-core peaks in TFLOP/s per GPU, from NVIDIA's data sheets.
# Matched in order against the device name, so the more specific names come first.
# FP8 doubles them; fp32 training runs its matmuls as TF32 at half the 16-bit peak.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM (device name e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
_DTYPE_FACTOR = {"bf16": 1.0, "fp16": 1.0, "fp8": 2.0, "fp32": 0.5}


def peak_tflops(device_name: str, dtype: str = "bf16") -> Optional[float]:
    """Dense peak TFLOP/s of a GPU named `device_name` for `dtype` (bf16/fp16/fp8/fp32=TF32),
    or None when the GPU is not in the table."""
    if dtype not in _DTYPE_FACTOR:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_FACTOR)}, got {dtype!r}")
    for pattern, bf16 in GPU_PEAK_BF16_TFLOPS:
        if pattern.lower() in device_name.lower():
            return bf16 * _DTYPE_FACTOR[dtype]
    return None


def device_peak(dtype: str = "bf16") -> tuple[Optional[float], str]:
    """(peak TFLOP/s or None, a description) of this process's device."""
    import torch

    from tulip_mega.parallel.init import use_cuda

    if not use_cuda():
        return None, "CPU: no peak table, TFLOP/s only"
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, dtype)
    if peak is None:
        return None, f"{name}: not in the peak table (tulip_mega/training/throughput.py), TFLOP/s only"
    return peak, f"{name}: {peak:g} TFLOP/s dense {dtype}"


def precision_name(cfg) -> str:
    """The dtype whose peak applies to the recipe: fp8 when FP8 GEMMs are on, else bf16/fp32."""
    from tulip_mega.parallel.init import compute_dtype

    if cfg.precision.fp8:
        return "fp8"
    return compute_dtype(cfg.precision.dtype)


def achieved_tflops(model_flops_per_sample: float, samples_per_sec: float, num_devices: int) -> float:
    """Model TFLOP/s per device: every device of the job shares the samples' work."""
    return model_flops_per_sample * samples_per_sec / num_devices / 1e12


def mfu(tflops_per_device: float, peak: Optional[float]) -> Optional[float]:
    """Fraction of the peak reached, or None without a known peak."""
    return tflops_per_device / peak if peak else None


def peak_memory_gib() -> float:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, peak RSS on a CPU."""
    import torch

    from tulip_mega.parallel.init import use_cuda

    if use_cuda():
        return torch.cuda.max_memory_allocated() / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (GIB if sys.platform == "darwin" else 1024**2)


class TimedIterator:
    """Wraps a batch iterator and adds up the time spent waiting in `next()`: the data-loader
    wait a step pays (0 when the loader keeps ahead)."""

    def __init__(self, iterator: Iterator) -> None:
        self._it = iterator
        self._wait = 0.0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self._wait += time.perf_counter() - t0

    def pop_wait(self) -> float:
        """Seconds waited since the last call (and reset)."""
        wait, self._wait = self._wait, 0.0
        return wait


class StragglerDetector:
    """Flags a step that took far longer than the running median of the recent steps.

    A slow step on a cluster usually means a sick node, a slow filesystem or a stuck
    collective; a warning with the numbers is the first hint. The first `warmup` steps
    (compilation, allocator growth) only fill the window.
    """

    def __init__(self, factor: float = 3.0, window: int = 50, warmup: int = 5) -> None:
        if factor <= 1:
            raise ValueError(f"straggler factor must be > 1, got {factor}")
        self.factor = factor
        self.warmup = warmup
        self._times: deque[float] = deque(maxlen=window)
        self._seen = 0

    def update(self, step: int, seconds: float) -> Optional[str]:
        """Record a step's time; returns a warning message when it is a straggler."""
        message = None
        if self._seen >= self.warmup and self._times:
            median = statistics.median(self._times)
            if median > 0 and seconds > self.factor * median:
                message = (f"slow step {step}: {seconds:.3f} s, {seconds / median:.1f}x the running median "
                           f"{median:.3f} s of the last {len(self._times)} steps (threshold {self.factor:g}x)")
        self._seen += 1
        if message is None:  # keep outliers out of the baseline
            self._times.append(seconds)
        return message


class LoaderWait:
    """Time the training step waited for the loader, as a fraction of step time after warm-up.

    The first ``warmup`` steps (loader start, pipeline build, reader workers filling their
    queues, allocator growth) are left out. Above ``threshold`` the loader is holding back the
    accelerator: ``check`` warns once during the run, ``summary`` at the end says it again with
    what to change. Both come from the recipe (logging.loader_wait_warmup_steps / _warn).
    """

    def __init__(self, warmup: int, threshold: float) -> None:
        self.warmup, self.threshold = warmup, threshold
        self.steps = 0
        self.wait = 0.0  # seconds, after warm-up
        self.step_time = 0.0
        self._warned = False

    def update(self, step_time: float, wait: float) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.wait += wait
            self.step_time += step_time

    @property
    def fraction(self) -> Optional[float]:
        """Wait / step time after warm-up; None before any step past warm-up."""
        return self.wait / self.step_time if self.step_time > 0 else None

    def _advice(self) -> str:
        return ("the loader is the bottleneck: raise data.reader_workers (host path: tar, JSON, tokenising; "
                "`tulip-mega plan` says how many cores a recipe needs), data.threads (DALI decode) or "
                "data.prefetch, or give the job more CPU cores per GPU")

    def check(self) -> Optional[str]:
        """A warning message the first time the fraction so far exceeds the threshold."""
        f = self.fraction
        if self._warned or f is None or f <= self.threshold:
            return None
        self._warned = True
        return (f"waiting for data: {f:.1%} of step time over {self.steps - self.warmup} steps after warm-up "
                f"(> {self.threshold:.0%}); {self._advice()}")

    def summary(self) -> tuple[str, bool]:
        """(one line for the end of the run, whether it is a warning)."""
        f = self.fraction
        if f is None:
            return f"loader wait: not measured (run of {self.steps} steps, warm-up {self.warmup})", False
        line = (f"loader wait: {self.wait:.2f} s of {self.step_time:.2f} s step time after {self.warmup} warm-up "
                f"steps = {f:.2%} (threshold {self.threshold:.0%})")
        if f > self.threshold:
            return f"{line}; {self._advice()}", True
        return line, False

