"""The DALI batch loader: the PIL loader's exact sample stream, DALI decode + every view.

Why a Python shard reader feeding ``fn.external_source`` rather than DALI's
``fn.readers.webdataset``:

- Bad data. Measured with DALI 2.4: a corrupt or truncated JPEG makes the decoder raise and
  leaves the pipeline unusable ("Current pipeline object is no longer valid"), and the
  webdataset reader has no per-sample skip for such a failure. With our own reader we know
  exactly which samples a failed run held, so the loader rebuilds the pipeline, probes the
  samples one by one, drops and counts the bad ones (warning with shard and key), and re-runs
  the good ones: the batch is exactly the one an undamaged run with the bad sample removed
  would give. Truncated tars, missing captions, non-UTF-8 text and malformed JSON are caught
  on the host before DALI sees the sample.
- Exact resume. The order of samples is the ``SampleStream``'s (shared with ``SimpleLoader``),
  so the position is (epoch, samples consumed in it), and every random number of a sample
  (views, EDA) is drawn from a generator seeded by (seed, DP rank, epoch, index in epoch) (see
  dali_pipeline); both loaders share the state format. TP ranks and several pipeline stages of
  one DP rank build the same loader and get the same batches.
- What counts as bad depends on what the recipe reads: ``key.json`` is parsed only when the
  loss terms need paraphrases/negatives; a missing or empty GeCo edit is not bad data (zeros,
  valid False), a corrupt one is (the whole sample is skipped).

Host work in parallel (``reader_workers`` = W > 0): W processes (``reader_pool``) read and
inspect whole shard slices ahead; the shuffle buffer stays here, and from 2 workers on the
position-seeded draws go back to the workers. Items, order and random numbers are those of the
sequential read for any W. Decode runs on the GPU (``device="mixed"``) when
``tulip_mega.parallel.init.use_cuda()`` is true, on the CPU otherwise; image tensors then live
on that device, token tensors on the host.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from tulip_mega.data.base import Batch
from tulip_mega.data.dali_pipeline import ViewPlan, build_pipeline, to_torch
from tulip_mega.data.host_prep import HostPrep, HostSample, Result
from tulip_mega.data.image_files import edit_file, image_file
from tulip_mega.data.reader_pool import READ_CHUNK, ReaderPool
from tulip_mega.data.mixture import MixturePart, MixtureStream, make_stream
from tulip_mega.data.sample_stream import Cursor, Entry, Position, StreamPositionMixin, read_slices
from tulip_mega.data.tokenizer import Tokenizer

__all__ = ["DaliLoader"]

logger = logging.getLogger(__name__)


@dataclass
class _Prepared:
    """A sample that passed the host-side checks: its bytes (kept by the reader) + host results."""

    key: str
    shard: str
    image: bytes  # key.jpg / .jpeg / .webp / .png (image_files.IMAGE_EXTS); DALI decodes each
    host: HostSample
    pos: Optional[bytes] = None
    neg: Optional[bytes] = None


@dataclass
class _Failure:
    """An exception raised in the prefetch thread, re-raised in the consumer."""

    error: BaseException


@lru_cache(maxsize=1)
def _placeholder_jpeg() -> np.ndarray:
    """A tiny valid JPEG fed in place of a missing GeCo edit (its view is zeroed afterwards)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class _ShardFiles:
    """Image bytes of a sample, from the sample dict or, where a reader worker sent only
    ``__offsets__``, read back from its shard with ``os.pread`` (open files kept per shard)."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._fds: dict[str, int] = {}

    def get(self, item: dict[str, Any], ext: str) -> Optional[bytes]:
        data = item.get(ext)
        if data is not None:
            return data
        where = item.get("__offsets__", {}).get(ext)
        if where is None:
            return None
        shard = item["__shard__"]
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= self.keep:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(shard, os.O_RDONLY)
        offset, size = where
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"shard {shard} changed while reading: {ext} of {item['__key__']!r} at byte {offset} "
                          f"has {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _stack(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows))


class DaliLoader(StreamPositionMixin):
    """``BatchLoader`` yielding every field of ``plan`` (view 0, crops, GeCo, EDA) via DALI."""

    def __init__(
        self,
        shards: list[str] | str | list[MixturePart],
        batch_size: int,
        plan: ViewPlan,
        tokenizer: Tokenizer,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        num_epochs: int | None = None,
        threads: int = 2,
        gpu: bool | None = None,
        prefetch: int = 1,
        reader_workers: int = 0,
        chunk_size: int = 64,
        read_chunk_size: int = READ_CHUNK,
    ) -> None:
        if batch_size < 1 or plan.image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {plan.image_size}")
        if threads < 1 or prefetch < 0 or reader_workers < 0 or chunk_size < 1 or read_chunk_size < 1:
            raise ValueError(f"threads, chunk_size and read_chunk_size must be >= 1, prefetch and reader_workers "
                             f">= 0, got {threads}, {chunk_size}, {read_chunk_size}, {prefetch}, {reader_workers}")
        if gpu is None:
            from tulip_mega.parallel.init import use_cuda

            gpu = use_cuda()
        self.stream = make_stream(shards, dp_rank, dp_size, seed, shuffle_buffer, num_epochs)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.plan = plan
        # The device is captured here, on the rank's main thread: the CUDA current device is
        # per thread, and the pipeline is built and run in the prefetch thread.
        self.device_id = torch.cuda.current_device() if gpu else None
        self.threads = threads
        self.prefetch = prefetch
        self.reader_workers = reader_workers  # processes for the host work; 0 = in the loader's thread
        self.chunk_size = chunk_size  # samples per unit of host work (draws, in the loader or a worker)
        self.read_chunk_size = read_chunk_size  # samples per reader-worker message (reader_pool.READ_CHUNK)
        self.gpu = gpu
        self._pool: Optional[ReaderPool] = None  # reader workers while an iteration runs (draws, too)
        self._pools: list[ReaderPool] = []  # every pool: one, or one per mixture dataset
        self._files = _ShardFiles()  # image bytes the workers left in the shard (offsets only)
        self._pipe = None  # built lazily; dropped (rebuilt) after a failed run
        self._rebuilds = 0

    # ------------------------------------------------------------------ host side

    def _chunks(self, entries: Iterator[Entry]) -> Iterator[list[Entry]]:
        while True:
            chunk = list(itertools.islice(entries, self.chunk_size))
            if not chunk:
                return
            yield chunk

    def _host_prep(self) -> HostPrep:
        return HostPrep(self.plan, self.tokenizer, self.stream.seed, self.stream.dp_rank)

    def host_stream(self, epoch: int = 0, consumed: int = 0) -> Iterator[tuple[Entry, Result]]:
        """Every entry from a position on with its host result, in stream order.

        With ``reader_workers`` > 0 a ``ReaderPool`` reads and inspects the shards ahead in
        that many processes, and once the shuffle buffer here has fixed the positions, two or
        more workers also make the position-dependent draws (``HostPrep.draw``) for chunks of them;
        the values are the same wherever they are computed, so results do not depend on the
        worker count. The host-only benchmark times this generator."""
        prep = self._host_prep()
        # A mixture reads its datasets' shards side by side: one pool per dataset (a pool serves
        # one ordered read at a time); the first also makes the draws.
        parts = len(self.stream.parts) if isinstance(self.stream, MixtureStream) else 0
        if self.reader_workers:
            self._pools = [ReaderPool(prep, self.reader_workers, chunk_size=self.read_chunk_size,
                                      name=f"dali-reader-dp{self.stream.dp_rank}" + (f"-{i}" if parts else ""))
                           for i in range(max(parts, 1))]
            self._pool = self._pools[0]
        try:
            read: Any = read_slices
            if self._pool is not None:
                read = [pool.read for pool in self._pools] if parts else self._pool.read
            chunks = self._chunks(self.stream.entries(epoch, consumed, read))
            # One worker reading and drawing is slower than the worker reading while this thread
            # draws (clip-rocket set: ~2,400 vs ~4,900 samples/s, benchmarks/RESULTS.md): a
            # worker's reader and draw threads share one GIL. From 2 workers on, they draw.
            if self._pool is None or not prep.draws_anything or self._pool.workers < 2:
                for chunk in chunks:
                    yield from zip(chunk, prep.prepare(chunk))
                return

            def requests() -> Iterator[tuple[Any, str, list]]:
                for chunk in chunks:
                    infos = prep.infos(chunk)
                    shard = next((e[2]["__shard__"] for e in chunk if isinstance(e[2], dict)), "?")
                    yield (chunk, infos), shard, prep.requests(chunk, infos)

            for (chunk, infos), drawn in self._pool.draw(requests()):  # the draws, in the workers
                yield from zip(chunk, prep.assemble(infos, drawn))
        finally:
            for pool in self._pools:
                pool.close()
            self._pools, self._pool = [], None
            self._files.close()

    # ------------------------------------------------------------------ DALI side

    def _execute(self, samples: list[_Prepared]) -> list[torch.Tensor]:
        if self._pipe is None:
            if self.gpu:
                torch.cuda.set_device(self.device_id)
            self._pipe = build_pipeline(self.plan, self.batch_size, self.threads, self.gpu, self.device_id)
        pipe = self._pipe
        pipe.feed_input("jpg", [np.frombuffer(s.image, dtype=np.uint8) for s in samples])
        if self.plan.uses_params:
            pipe.feed_input("params", [s.host.params for s in samples])
        if self.plan.edits:
            for name in ("pos", "neg"):
                data = [getattr(s, name) for s in samples]
                pipe.feed_input(name, [_placeholder_jpeg() if d is None else np.frombuffer(d, np.uint8) for d in data])
        return [to_torch(out, self.device_id) for out in pipe.run()]

    def _run(self, samples: list[_Prepared]) -> tuple[Optional[list[torch.Tensor]], list[tuple[_Prepared, str]]]:
        """(outputs, []) or (None, [(bad sample, reason), ...]) after isolating the bad ones.

        A failed run invalidates the pipeline, so it is rebuilt; each sample is then run alone
        to find the culprits. A failure that no single sample reproduces is not bad data and
        is raised.
        """
        try:
            return self._execute(samples), []
        except RuntimeError as error:
            self._pipe, self._rebuilds = None, self._rebuilds + 1
            bad = []
            for s in samples:
                try:
                    self._execute([s])
                except RuntimeError as e:
                    self._pipe, self._rebuilds = None, self._rebuilds + 1
                    reason = " ".join(str(e).split())
                    bad.append((s, f"undecodable image in DALI ({reason[:300]})"))
            if not bad:
                raise RuntimeError(
                    f"DALI pipeline failed on a batch whose samples all decode alone: {error}"
                ) from error
            return None, bad

    def _collate(self, samples: list[_Prepared], outs: list[torch.Tensor]) -> Batch:
        plan = self.plan
        hosts = [s.host.info for s in samples]
        batch = Batch(images=outs[0], tokens=_stack([h.tokens for h in hosts]), keys=[s.key for s in samples])
        rest = iter(outs[1:])
        if plan.crops:
            batch.crops = next(rest)  # [B, G-1, 3, H, W]
        if plan.local_crops:
            batch.local_crops = next(rest)  # [B, n, 3, h, w]
        if plan.edits:
            valid = torch.tensor([[h.has_pos, h.has_neg] for h in hosts], dtype=torch.bool)
            edits = next(rest)  # [B, 2, 3, H, W]; a placeholder was decoded where an edit is missing
            edits[~valid.to(edits.device)] = 0.0
            batch.edits, batch.edit_valid = edits, valid
        if plan.paraphrases:
            batch.paraphrases = _stack([h.paraphrases for h in hosts])  # [B, P, L]
            batch.paraphrase_valid = _stack([h.paraphrase_valid for h in hosts])
        if plan.negatives:
            batch.negatives = _stack([h.negatives for h in hosts])  # [B, N, L]
            batch.negative_valid = _stack([h.negative_valid for h in hosts])
        if plan.eda:
            batch.eda_tokens = _stack([s.host.eda_tokens for s in samples])
        if plan.regions:
            batch.region_tokens = _stack([h.region_tokens for h in hosts])  # [B, R, L]
            batch.region_boxes = _stack([h.region_boxes for h in hosts])  # [B, R, 4]
            batch.region_valid = _stack([h.region_valid for h in hosts])  # [B, R]
        return batch

    # ------------------------------------------------------------------ iteration

    def _prepared(self, item: dict[str, Any], result: HostSample) -> _Prepared:
        """A host-checked sample with the image bytes DALI decodes (read back where a worker sent offsets)."""
        files = self._files
        return _Prepared(key=item["__key__"], shard=item["__shard__"], image=files.get(item, image_file(item)),
                         host=result, pos=files.get(item, edit_file(item, "pos")) if result.info.has_pos else None,
                         neg=files.get(item, edit_file(item, "neg")) if result.info.has_neg else None)

    def _flush(self, pending: list[_Prepared], cursor: Cursor) -> tuple[Optional[Batch], list[_Prepared]]:
        """(batch of ``pending``, []); or, when DALI rejected samples, (None, the others) after
        skipping the bad ones."""
        outs, bad = self._run(pending)
        if not bad:
            return self._collate(pending, outs), []
        for s, reason in bad:
            cursor.skip(reason, s.key, s.shard)
        drop = {id(s) for s, _ in bad}
        return None, [s for s in pending if id(s) not in drop]

    def _produce(self) -> Iterator[tuple[Optional[Batch], Position]]:
        """(batch, position after it) pairs from the committed position; a final (None, position).

        ``__iter__`` commits a position only when its batch is handed out, so a producer
        running ahead never moves the checkpoint.
        """
        cursor = self.stream.cursor()
        pending: list[_Prepared] = []
        for entry, result in self.host_stream(cursor.epoch, cursor.consumed):
            item = cursor.advance(entry)
            if item is None or result is None:
                continue
            if isinstance(result, str):
                cursor.skip_item(item, result)
                continue
            pending.append(self._prepared(item, result))
            cursor.keep()
            if len(pending) == self.batch_size:
                batch, pending = self._flush(pending, cursor)
                if batch is not None:
                    yield batch, cursor.emit(len(batch))
        while pending:  # finite runs: the short last batch (after dropping any bad samples)
            batch, pending = self._flush(pending, cursor)
            if batch is not None:
                yield batch, cursor.emit(len(batch))
        yield None, cursor.position()

    def _commit(self, position: Position) -> None:
        self.stream.position = position

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches starting right after the last batch yielded (or the loaded state).

        With ``prefetch`` > 0 a background thread prepares that many batches ahead (DALI and
        sentencepiece release the GIL), so the training step rarely waits; results and
        positions are identical to the synchronous path, which ``prefetch=0`` runs.
        """
        produced = self._produce() if self.prefetch == 0 else self._prefetched()
        with contextlib.closing(produced):  # closing stops the reader workers and the prefetch thread
            for batch, position in produced:
                self._commit(position)
                if batch is None:
                    return
                yield batch

    def _prefetched(self) -> Iterator[tuple[Optional[Batch], Position]]:
        """``_produce``'s pairs, made up to ``prefetch`` ahead in a background thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            if self.gpu:
                torch.cuda.set_device(self.device_id)
            try:
                with contextlib.closing(self._produce()) as produced:  # closing stops the reader workers
                    for item in produced:
                        if not put(item):
                            return
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                put(_Failure(e))

        thread = threading.Thread(target=work, name=f"dali-loader-dp{self.stream.dp_rank}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, _Failure):
                    raise item.error
                yield item
                if item[0] is None:
                    return
        finally:
            stop.set()
            thread.join()

    def stats(self) -> dict[str, int]:
        """``samples``, ``skipped`` (cumulative over resumes) and ``pipeline_rebuilds`` (this process)."""
        return {**self.stream.stats(), "pipeline_rebuilds": self._rebuilds}
