"""Peak memory of one measured region, per process: CPU resident set (kernel-measured) or CUDA.

CPU: before the region, malloc_trim(0) hands freed heap back to the OS and writing "5" to
/proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS; after it, VmHWM minus the RSS
before is everything the region touched. Run the process with MALLOC_MMAP_THRESHOLD_=131072 so
every allocation over 128 KiB is its own mmap, released on free (glibc's adaptive threshold
would otherwise keep freed blocks resident and hide allocations); see loss_memory.py's notes.
Where clear_refs cannot be written, ru_maxrss (peak since start) minus the RSS before is a
lower bound; `method` says which ran. CUDA: torch.cuda.max_memory_allocated after a reset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def reset_peak() -> tuple[str, int]:
    """Start a measured region; returns (method, bytes in use before it)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "cuda", torch.cuda.memory_allocated()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM", _status_kib("VmRSS") * 1024
    except OSError:
        try:
            rss = _status_kib("VmRSS") * 1024
        except (OSError, KeyError):
            rss = 0
        return "ru_maxrss", rss


def peak_since(method: str, before: int) -> int:
    """Bytes the region added at its peak (>= 0)."""
    if method == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif method == "VmHWM":
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return max(0, peak - before)
