"""The data rate a recipe needs: samples/s, JPEG decodes/s and host CPU cores per GPU.

Pure arithmetic on a `plan.Plan` and the recipe's input streams (no torch import), printed by
`tulip-mega plan` under the speed estimate:

  samples/s per loading rank   = pairs/s of the whole job / DP: every rank that builds a loader
                                 (TP ranks and pipeline stages of one DP replica each build one,
                                 with the same batches) must deliver its replica's share
  decodes/s per rank           = samples/s x JPEGs per sample (the image, + pos/neg GeCo edits)
  views/s per rank             = samples/s x resized views per sample (view 0, extra global
                                 crops, local crops, the two edits): the GPU augmentation work
  host cores per rank          = samples/s / host samples per core-second

The host rate is what `benchmarks/loader.py --host-only` measures: samples per CPU-second of
the DALI loader's host path (tar read, shuffle, JSON, JPEG header, view parameters, EDA,
tokenising; decode runs on the GPU), for a plain SigLIP, a clip-rocket and a full TULIP sample
set. The defaults below are this repo's measurement (benchmarks/RESULTS.md, 2 shared cores of a
cloud VM, 32 px shapes set); server cores are usually faster, and real captions are longer:
measure yours and pass `--host-samples-per-core`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

__all__ = ["HOST_CORE_SHARE", "HOST_SAMPLES_PER_CORE", "DataRate", "data_rate", "format_data_rate", "sample_set"]

# Samples per CPU-second of the host path with reader workers, measured by
# `benchmarks/loader.py --host-only --image-size 32 --samples 4096 --samples-per-shard 1024`
# with 2 reader workers on 2 cores of a shared cloud VM, 2026-11-30, with the lean tar reader
# (benchmarks/RESULTS.md: the lowest of three runs under load 4-6, 7954 / 4537 / 2553 samples
# per CPU-second, rounded down; a busy machine lowers this figure, so it errs on the safe side).
HOST_SAMPLES_PER_CORE: dict[str, float] = {"siglip": 7900.0, "clip_rocket": 4500.0, "tulip": 2500.0}
HOST_CORE_SHARE = 0.8  # plan reader workers for this fraction of a core each (headroom for the loader thread)


@dataclasses.dataclass(frozen=True)
class DataRate:
    sample_set: str  # which measured host rate applies: siglip, clip_rocket or tulip
    samples_per_s: float  # per loading rank
    decodes_per_sample: int
    views_per_sample: int
    host_samples_per_core: float
    reader_workers: int

    @property
    def decodes_per_s(self) -> float:
        return self.samples_per_s * self.decodes_per_sample

    @property
    def views_per_s(self) -> float:
        return self.samples_per_s * self.views_per_sample

    @property
    def host_cores(self) -> float:
        return self.samples_per_s / self.host_samples_per_core


def sample_set(streams) -> str:
    """The benchmark's sample set closest to what the recipe's loss terms read per sample."""
    if streams.geco_edits or streams.paraphrases or streams.negatives or streams.local_crops:
        return "tulip"
    if streams.eda_caption or streams.extra_global_crops:
        return "clip_rocket"
    return "siglip"


def data_rate(cfg, plan, host_samples_per_core: Optional[float] = None) -> DataRate:
    """What each loading rank of `plan` must deliver at its MFU, and the host cores that takes."""
    s = plan.layout.streams
    name = sample_set(s)
    rate = host_samples_per_core if host_samples_per_core is not None else HOST_SAMPLES_PER_CORE[name]
    if rate <= 0:
        raise ValueError(f"--host-samples-per-core must be > 0, got {rate}")
    edits = 2 if s.geco_edits else 0
    return DataRate(
        sample_set=name, samples_per_s=plan.samples_per_s / plan.layout.data_parallel, decodes_per_sample=1 + edits,
        views_per_sample=1 + s.extra_global_crops + s.local_crops + edits, host_samples_per_core=rate,
        reader_workers=cfg.data.reader_workers,
    )


def format_data_rate(rate: DataRate, default_rate: bool) -> str:
    where = (f"default for a {rate.sample_set} sample set, benchmarks/RESULTS.md" if default_rate
             else "--host-samples-per-core")
    cores = rate.host_cores
    lines = [
        f"data rate per loading rank (pairs/s / DP): {rate.samples_per_s:,.0f} samples/s, "
        f"{rate.decodes_per_s:,.0f} JPEG decodes/s ({rate.decodes_per_sample} per sample), "
        f"{rate.views_per_s:,.0f} views/s ({rate.views_per_sample} per sample)",
        f"host path at {rate.host_samples_per_core:,.0f} samples per core-second ({where}): "
        f"{cores:.2f} CPU cores per loading rank, plus what DALI's own threads need",
    ]
    needed = math.ceil(cores / HOST_CORE_SHARE)
    if needed > max(rate.reader_workers, 1):
        lines.append(f"note: data.reader_workers={rate.reader_workers} gives the host path about "
                     f"{max(rate.reader_workers, 1)} core(s); set it to at least {needed} so the loader keeps up "
                     f"(each worker counted at {HOST_CORE_SHARE:.0%} of a core: the loader thread shuffles and "
                     "feeds DALI)")
    return "\n".join(lines)
