"""The GeCo text shard loop: resumable, one process per GPU, shards split over a SLURM array.

Why shard-level: a shard is the unit that is either done or not. Each output shard is written
to ``OUT/<name>.partial`` and renamed to ``OUT/<name>`` only after the last byte is on disk,
so the final name existing IS the completion marker: a re-run skips it, and a process killed
mid-shard leaves only a ``.partial`` (never read by loaders: not ``*.tar``), which the next run
overwrites. No sample is duplicated or lost across a kill, because a shard is always
regenerated whole, from the same per-shard seed.

Every field of an input sample (jpg, txt, pos/neg jpg, other json keys) is copied unchanged
and in order; only ``key.json`` gains ``paraphrases``, ``negatives`` (replacing any present),
``negative_kinds`` and ``geco_text`` (the generator: ``"method": "llm"`` or ``"rules"``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from dataloaders.geco.text import GecoTexts
from dataloaders.shards import ShardReadError, expand_shards, iter_samples

__all__ = ["GecoSummary", "TextGenerator", "run_geco_text", "select_shards", "shard_seed", "worker_from_env"]

logger = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"


class TextGenerator(Protocol):
    """What the shard loop needs from a generator (``LLMTextGenerator``, ``RuleTextGenerator``)."""

    def start_shard(self, shard_seed: int) -> None: ...
    def generate(self, captions: Sequence[str], keys: Sequence[str]) -> list[GecoTexts]: ...
    def metadata(self) -> dict[str, Any]: ...


@dataclass
class GecoSummary:
    """What one worker did: shards written / skipped, samples, drop reasons, throughput."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    samples: int = 0
    without_caption: int = 0
    paraphrases: int = 0
    negatives: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def shard_seed(seed: int, shard: str) -> int:
    """A 63-bit seed from (run seed, shard file name): independent of worker count and order."""
    digest = hashlib.sha256(f"geco/{seed}/{os.path.basename(shard)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def select_shards(shards: Sequence[str], worker: int, num_workers: int) -> list[str]:
    """Worker ``worker`` of ``num_workers`` takes every ``num_workers``-th shard (round robin)."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, {num_workers}), got {worker} (num_workers={num_workers})")
    return list(shards[worker::num_workers])


def worker_from_env(env: Optional[dict[str, str]] = None) -> tuple[int, int, int]:
    """(worker, num_workers, local_rank) from SLURM: array task x tasks of that job step.

    Array task ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``, and
    within it task ``SLURM_PROCID`` of ``SLURM_NTASKS`` (one per GPU; ``SLURM_LOCALID`` picks the
    GPU). Outside SLURM: worker 0 of 1.
    """
    env = dict(os.environ if env is None else env)
    array_id = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    array_count = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    ntasks = int(env.get("SLURM_NTASKS", 1)) if "SLURM_PROCID" in env else 1
    procid = int(env.get("SLURM_PROCID", 0))
    local = int(env.get("SLURM_LOCALID", env.get("LOCAL_RANK", 0)))
    return array_id * ntasks + procid, array_count * ntasks, local


def _caption(sample: dict[str, Any]) -> Optional[str]:
    try:
        text = sample["txt"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        return None
    return text or None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _read(shard: str, summary: GecoSummary) -> Iterator[dict[str, Any]]:
    """The shard's samples; on damage the good ones before it, a warning, and a count."""
    try:
        for sample in iter_samples(shard):
            if not sample.get("__partial__"):
                yield sample
    except ShardReadError as e:
        logger.warning("geco text: %s (its good samples are kept)", e)
        summary.damaged.append(shard)


def _batches(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_sample(tar: tarfile.TarFile, sample: dict[str, Any], meta: Optional[dict[str, Any]]) -> None:
    """All of the sample's files in their order; ``json`` replaced by ``meta`` when given."""
    key = sample["__key__"]
    exts = [e for e in sample if not e.startswith("__")]
    if meta is not None and "json" not in exts:
        exts.append("json")
    for ext in exts:
        data = sample[ext]
        if ext == "json" and meta is not None:
            data = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        _add(tar, f"{key}.{ext}", data)


def _process_shard(
    shard: str, out_path: str, generator: TextGenerator, seed: int, batch_size: int,
    summary: GecoSummary, progress: Any,
) -> None:
    partial = out_path + PARTIAL_SUFFIX
    generator.start_shard(shard_seed(seed, shard))
    tag = {**generator.metadata(), "seed": seed}
    try:
        with open(partial, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for batch in _batches(_read(shard, summary), batch_size):
                    todo = []  # (index in batch, caption, old json)
                    for i, s in enumerate(batch):
                        caption = _caption(s)
                        try:
                            old = json.loads(s["json"].decode("utf-8")) if "json" in s else {}
                        except (UnicodeDecodeError, json.JSONDecodeError):
                            old = None
                        if caption is None or not isinstance(old, dict):
                            summary.without_caption += 1  # copied unchanged: the loaders judge it
                        else:
                            todo.append((i, caption, old))
                    texts = generator.generate([c for _, c, _ in todo], [batch[i]["__key__"] for i, _, _ in todo])
                    metas: dict[int, dict[str, Any]] = {}
                    for (i, _, old), t in zip(todo, texts, strict=True):
                        metas[i] = {**old, "paraphrases": t.paraphrases, "negatives": t.negatives,
                                    "negative_kinds": t.negative_kinds, "geco_text": tag}
                        summary.paraphrases += len(t.paraphrases)
                        summary.negatives += len(t.negatives)
                        summary.dropped.update(t.dropped)
                    for i, s in enumerate(batch):
                        _write_sample(tar, s, metas.get(i))
                    summary.samples += len(batch)
                    progress.update(len(batch))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out_path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def run_geco_text(
    in_spec: str,
    out_dir: str,
    generator: TextGenerator,
    seed: int = 0,
    batch_size: int = 16,
    worker: int = 0,
    num_workers: int = 1,
    progress: bool = True,
) -> GecoSummary:
    """Write GeCo texts for this worker's shards of ``in_spec`` into ``out_dir`` (same names).

    Shards whose output already exists are skipped (complete by construction); a stale
    ``.partial`` is overwritten. ``batch_size`` is in captions (an LLM sees
    ``batch_size * prompts per caption`` prompts per forward at most its own batch size).
    """
    shards = expand_shards(in_spec)
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"input shards share file names {dup[:3]}; outputs are named after inputs")
    out_dir = os.path.abspath(out_dir)
    if any(os.path.dirname(os.path.abspath(s)) == out_dir for s in shards):
        raise ValueError(f"--out {out_dir} is the folder of the input shards; write GeCo shards elsewhere")
    os.makedirs(out_dir, exist_ok=True)
    mine = select_shards(shards, worker, num_workers)
    summary = GecoSummary()
    bar: Any = _NoProgress()
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="sample", desc=f"geco text {worker}/{num_workers}", smoothing=0.1, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for shard in mine:
            out_path = os.path.join(out_dir, os.path.basename(shard))
            if os.path.exists(out_path):
                summary.skipped.append(out_path)
                continue
            _process_shard(shard, out_path, generator, seed, batch_size, summary, bar)
            summary.written.append(out_path)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    logger.info("geco text worker %d/%d: %d shards written, %d skipped, %d samples in %.1f s (%.1f samples/s)",
                worker, num_workers, len(summary.written), len(summary.skipped), summary.samples,
                summary.seconds, summary.samples_per_second)
    return summary
