"""The GeCo shard loop (text and image stages): resumable, one process per GPU, SLURM arrays.

Why shard-level: a shard is the unit that is either done or not. Each output shard is written
to ``OUT/<name>.partial`` and renamed to ``OUT/<name>`` only after the last byte is on disk,
so the final name existing IS the completion marker: a re-run skips it, and a process killed
mid-shard leaves only a ``.partial`` (never read by loaders: not ``*.tar``), which the next run
overwrites. No sample is duplicated or lost across a kill, because a shard is always
regenerated whole, from the same per-shard seed.

A stage (``TextStage`` here, ``geco.image.ImageStage``) sees batches of samples and returns,
per sample, only the files it replaces, adds (bytes) or removes (None). Every other file of
the sample is copied unchanged and in order. The text stage sets ``key.json``'s
``paraphrases``, ``negatives`` (replacing any present), ``negative_kinds`` and ``geco_text``
(the generator: ``"method": "llm"`` or ``"rules"``).
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

from tulip_mega.datagen.geco.text import GecoTexts
from tulip_mega.data.shards import ShardReadError, expand_shards, iter_samples

__all__ = [
    "GecoStage",
    "GecoSummary",
    "TextGenerator",
    "TextStage",
    "Updates",
    "run_geco",
    "run_geco_text",
    "sample_seed",
    "select_shards",
    "shard_seed",
    "worker_from_env",
]

logger = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"

# What a stage returns for one sample: extension -> new bytes (replace or add) or None (remove).
Updates = dict[str, Optional[bytes]]


@dataclass
class GecoSummary:
    """What one worker did: shards written / skipped, samples, what was made and dropped, speed."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    samples: int = 0
    unchanged: int = 0  # copied as they were: no caption, unreadable json or image
    made: Counter = field(default_factory=Counter)  # e.g. paraphrases, negatives, pos_images
    dropped: Counter = field(default_factory=Counter)  # generated but rejected, by reason
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The one-line JSON report the CLI prints (counts flattened next to the totals)."""
        return {"written": len(self.written), "skipped": len(self.skipped), "damaged": self.damaged,
                "samples": self.samples, "unchanged": self.unchanged, **dict(sorted(self.made.items())),
                "dropped": dict(self.dropped), "samples_per_s": round(self.samples_per_second, 2)}


class GecoStage(Protocol):
    """One GeCo stage over batches of samples (dicts of extension -> bytes, plus ``__key__``)."""

    name: str  # "text" / "image": progress bar and log label

    def start_shard(self, run_seed: int, shard_seed: int) -> None: ...
    def process(self, batch: Sequence[dict[str, Any]], summary: GecoSummary) -> list[Updates]: ...


def shard_seed(seed: int, shard: str) -> int:
    """A 63-bit seed from (run seed, shard file name): independent of worker count and order."""
    digest = hashlib.sha256(f"geco/{seed}/{os.path.basename(shard)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_seed(shard_seed_: int, key: str, what: str) -> int:
    """A 63-bit seed for one generated item of one sample: independent of batching and order."""
    digest = hashlib.sha256(f"{shard_seed_}/{key}/{what}".encode()).digest()
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


def caption_of(sample: dict[str, Any]) -> Optional[str]:
    """The sample's caption (``key.txt``), or None when missing, empty or not UTF-8."""
    try:
        text = sample["txt"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        return None
    return text or None


def meta_of(sample: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The sample's ``key.json`` object ({} when absent), or None when it is not a JSON object."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def encode_meta(meta: dict[str, Any]) -> bytes:
    """``key.json`` bytes: sorted keys, so equal content is byte-identical."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


class TextGenerator(Protocol):
    """What the text stage needs from a generator (``LLMTextGenerator``, ``RuleTextGenerator``)."""

    def start_shard(self, shard_seed: int) -> None: ...
    def generate(self, captions: Sequence[str], keys: Sequence[str]) -> list[GecoTexts]: ...
    def metadata(self) -> dict[str, Any]: ...


class TextStage:
    """Paraphrases and negatives of each caption into ``key.json`` (``tulip-mega geco text``)."""

    name = "text"

    def __init__(self, generator: TextGenerator) -> None:
        self.generator = generator
        self.tag: dict[str, Any] = {}

    def start_shard(self, run_seed: int, shard_seed: int) -> None:
        self.generator.start_shard(shard_seed)
        self.tag = {**self.generator.metadata(), "seed": run_seed}

    def process(self, batch: Sequence[dict[str, Any]], summary: GecoSummary) -> list[Updates]:
        updates: list[Updates] = [{} for _ in batch]
        todo = []  # (index in batch, caption, old json)
        for i, s in enumerate(batch):
            caption, old = caption_of(s), meta_of(s)
            if caption is None or old is None:
                summary.unchanged += 1  # copied unchanged: the loaders judge it
            else:
                todo.append((i, caption, old))
        texts = self.generator.generate([c for _, c, _ in todo], [batch[i]["__key__"] for i, _, _ in todo])
        for (i, _, old), t in zip(todo, texts, strict=True):
            updates[i]["json"] = encode_meta({**old, "paraphrases": t.paraphrases, "negatives": t.negatives,
                                              "negative_kinds": t.negative_kinds, "geco_text": self.tag})
            summary.made["paraphrases"] += len(t.paraphrases)
            summary.made["negatives"] += len(t.negatives)
            summary.dropped.update(t.dropped)
        return updates


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _read(shard: str, summary: GecoSummary, stage: str) -> Iterator[dict[str, Any]]:
    """The shard's samples; on damage the good ones before it, a warning, and a count."""
    try:
        for sample in iter_samples(shard):
            if not sample.get("__partial__"):
                yield sample
    except ShardReadError as e:
        logger.warning("geco %s: %s (its good samples are kept)", stage, e)
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


def _write_sample(tar: tarfile.TarFile, sample: dict[str, Any], updates: Updates) -> None:
    """The sample's files in their order with ``updates`` applied; added files go last."""
    key = sample["__key__"]
    exts = [e for e in sample if not e.startswith("__")]
    exts += [e for e in updates if e not in exts]
    for ext in exts:
        data = updates[ext] if ext in updates else sample[ext]
        if data is not None:
            _add(tar, f"{key}.{ext}", data)


def _process_shard(
    shard: str, out_path: str, stage: GecoStage, seed: int, batch_size: int, summary: GecoSummary, progress: Any,
) -> None:
    partial = out_path + PARTIAL_SUFFIX
    stage.start_shard(seed, shard_seed(seed, shard))
    try:
        with open(partial, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for batch in _batches(_read(shard, summary, stage.name), batch_size):
                    for sample, updates in zip(batch, stage.process(batch, summary), strict=True):
                        _write_sample(tar, sample, updates)
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


def run_geco(
    in_spec: str,
    out_dir: str,
    stage: GecoStage,
    seed: int = 0,
    batch_size: int = 16,
    worker: int = 0,
    num_workers: int = 1,
    progress: bool = True,
) -> GecoSummary:
    """Run ``stage`` over this worker's shards of ``in_spec`` into ``out_dir`` (same names).

    Shards whose output already exists are skipped (complete by construction); a stale
    ``.partial`` is overwritten. ``batch_size`` is in samples per ``stage.process`` call.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
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

        bar = tqdm(unit="sample", desc=f"geco {stage.name} {worker}/{num_workers}", smoothing=0.1,
                   dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for shard in mine:
            out_path = os.path.join(out_dir, os.path.basename(shard))
            if os.path.exists(out_path):
                summary.skipped.append(out_path)
                continue
            _process_shard(shard, out_path, stage, seed, batch_size, summary, bar)
            summary.written.append(out_path)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    logger.info("geco %s worker %d/%d: %d shards written, %d skipped, %d samples in %.1f s (%.1f samples/s)",
                stage.name, worker, num_workers, len(summary.written), len(summary.skipped), summary.samples,
                summary.seconds, summary.samples_per_second)
    return summary


def run_geco_text(in_spec: str, out_dir: str, generator: TextGenerator, **kwargs: Any) -> GecoSummary:
    """``run_geco`` with the text stage: ``batch_size`` is in captions (an LLM sees
    ``batch_size * prompts per caption`` prompts, cut into its own generation batches)."""
    return run_geco(in_spec, out_dir, TextStage(generator), **kwargs)
