"""Reader worker processes: read and inspect whole shards ahead, hand samples back in order.

Why processes, and why by shard: the host work per sample is Python holding the GIL (threads
do not scale it), and a large part of it is reading the tar itself. So a
worker takes whole shards: it reads one with ``shards.iter_samples`` (the same reader, so the
same samples, the same partial last sample and the same damage message), runs
``HostPrep.record`` on chunks of it (JSON, JPEG header, tokenising) and sends the records back,
one message per chunk with the chunk's caption tokens as one array (``_pack``).
Shard slice k of the read order (``dp_split.ShardSlice``: this DP rank's samples of a shard)
goes to worker ``k % W`` and is read back from that worker's own FIFO queue, so the loader
sees exactly the item sequence a sequential read gives, whatever W is.
The shuffle buffer stays in the loader (its order depends on every item before it); once it
has fixed the positions, ``draw`` hands chunks of them back to the workers (chunk c to worker
c % W, a second thread in each worker) for the position-seeded view parameters and EDA copies.

- Start method: ``forkserver`` (the trainer holds torch / gloo threads, under which ``fork``
  is unsafe) with this module preloaded, so a worker starts in milliseconds instead of
  re-importing torch; ``spawn`` where forkserver does not exist. As with any non-fork start
  method, a script that builds the loader needs an ``if __name__ == "__main__":`` guard.
  A worker starts with the loader's object-store settings of the moment (``AWS_*``, ``MSC_*``;
  ``_store_env``), not those the fork server was started with.
- Bounded: at most ``ahead`` shards per worker are requested, and each worker's queue holds
  at most ``queue_chunks`` chunks. A worker must be able to run a whole shard ahead of the
  loader (which drains shard k from one worker while the next worker reads shard k+1), so
  records carry the image files' offsets rather than their bytes (~1 KB per sample: 16
  messages of 1024 samples is ~16k samples, ~20 MB); compressed shards, which have no offsets,
  carry bytes, and a message then ends at ``MAX_CHUNK_BYTES``.
- Worker death (OOM kill, segfault) is not a hang: the loader waits with a timeout, checks
  ``Process.exitcode`` and raises naming the worker and the shard it was reading; it holds no
  write end of a worker's result pipe, so a worker killed in the middle of sending a message
  is an end-of-file, not a read that blocks forever. An exception
  inside a worker comes back with its traceback and is raised the same way. Workers exit by
  themselves when the loader process is gone.
- Stop signals: SLURM delivers SIGUSR1 / SIGTERM to every process of a job step (and
  ``kill -- -PGID`` to a whole process group), workers included. The trainer decides what a
  stop means (checkpoint at the next step boundary, then close the loader), so the workers,
  the fork server and multiprocessing's resource tracker must not die of it: they start with
  those signals blocked (inherited from the starting thread) and workers then ignore them.
  So ``close`` ends a busy worker with SIGKILL, and pools still open at interpreter exit are
  closed by an exit hook that runs before multiprocessing's own (which would SIGTERM the
  workers and wait for them forever).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 - its exit hook is registered before ours
import os
import queue
import signal
import traceback
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from tulip_mega.data.dp_split import ShardSlice, read_slice
from tulip_mega.data.host_prep import HOST, Drawn, HostPrep, Inspected, Request
from tulip_mega.data.shards import ShardReadError
from tulip_mega.data.sample_stream import Damaged, Item

__all__ = ["ReaderPool", "ReaderWorkerError"]

_POLL_S = 0.2  # how often a waiting loader checks that its workers are alive
# Samples per worker message: large, because every message wakes the loader and the queue's
# feeder thread, and on a machine with as many cores as workers those wake-ups take the CPU the
# other worker needs. Plain-SigLIP host path, 2 workers over 1, 2 cores, 16k samples:
# 1.50x at 64 samples per message, 1.86x at 256, 2.00x at 1024 (benchmarks/RESULTS.md).
READ_CHUNK = 1024
# ... unless the samples carry their image bytes (compressed shards: no offsets): then a
# message ends at this many bytes, so the queue's bound stays a bound on memory.
MAX_CHUNK_BYTES = 8 << 20
# Each worker's result queue holds at most this many samples (~1 KB each without image bytes):
# enough for a whole shard ahead of the loader, which drains shard k from one worker while the
# next reads shard k+1.
QUEUE_SAMPLES = 16384


# Signals the loader's process decides on (tulip_mega.training.signals); Ctrl-C too.
_PARENT_DECIDES = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


# Pools not closed yet; closed at exit by a hook registered after multiprocessing.util's
# (imported above), so it runs first.
_OPEN_POOLS: "weakref.WeakSet[ReaderPool]" = weakref.WeakSet()


def _close_open_pools() -> None:
    for pool in list(_OPEN_POOLS):
        pool.close()


atexit.register(_close_open_pools)


class ReaderWorkerError(RuntimeError):
    """A reader worker died or raised; the message names the worker and the shards it held."""


def _loader_alive(parent: int) -> bool:
    """Whether the process that started this worker still runs (under forkserver the OS parent
    is the fork server, so ``os.getppid`` would not tell)."""
    proc = mp.parent_process()
    if proc is not None:
        return proc.is_alive()
    try:
        os.kill(parent, 0)
    except OSError:
        return False
    return True


def _put(outbox: Any, msg: Any, parent: int) -> bool:
    """Put with a bounded queue, giving up when the loader process is gone."""
    while True:
        try:
            outbox.put(msg, timeout=1.0)
            return True
        except queue.Full:
            if not _loader_alive(parent):
                return False


def _pack(records: list[Any]) -> tuple[list[Any], np.ndarray | None]:
    """One chunk's records as one message: the caption token rows of its good samples as one
    [n, L] array instead of one small array per sample (unpickling those was the largest part
    of the loader thread's per-sample cost). The records are this worker's own, about to go."""
    infos = [r[HOST] for r in records if isinstance(r, dict) and isinstance(r.get(HOST), Inspected)]
    if not infos:
        return records, None
    tokens = np.stack([info.tokens for info in infos])  # [n, L]
    for info in infos:
        info.tokens = None
    return records, tokens


def _unpack(payload: tuple[list[Any], np.ndarray | None]) -> list[Any]:
    """``_pack`` undone in the loader: each good sample's tokens are its row of the array."""
    records, tokens = payload
    if tokens is not None:
        rows = iter(tokens)
        for r in records:
            if isinstance(r, dict):
                info = r.get(HOST)
                if isinstance(info, Inspected):
                    info.tokens = next(rows)
    return records


def _payload_bytes(item: dict[str, Any]) -> int:
    """Bytes a sample adds to a worker message: its image files when the shard gives no
    offsets for them (compressed shards); ~0 otherwise (``HostPrep.record`` drops them)."""
    if "__offsets__" in item:
        return 0
    return sum(len(v) for v in item.values() if isinstance(v, (bytes, bytearray)))


def _read(prep: HostPrep, piece: ShardSlice | str, chunk_size: int, outbox: Any, parent: int,
          max_chunk_bytes: int = MAX_CHUNK_BYTES) -> bool:
    """Read, inspect and send one shard slice (a path: the whole shard), then an "end"."""
    if isinstance(piece, str):
        piece = ShardSlice(piece)
    chunk: list[Any] = []
    size = 0
    try:
        for item in read_slice(piece, offsets=True):
            chunk.append(item)
            size += _payload_bytes(item)
            if len(chunk) == chunk_size or size >= max_chunk_bytes:
                if not _put(outbox, ("items", _pack(prep.record(chunk))), parent):
                    return False
                chunk, size = [], 0
    except ShardReadError as e:  # exactly what sample_stream.read_slices does in-process
        chunk = prep.record(chunk) + [Damaged(piece.shard, str(e))]
        return _put(outbox, ("items", _pack(chunk)), parent) and _put(outbox, ("end", None), parent)
    if chunk and not _put(outbox, ("items", _pack(prep.record(chunk))), parent):
        return False
    return _put(outbox, ("end", None), parent)


def _serve_draws(prep: HostPrep, inbox: Any, outbox: Any, parent: int) -> None:
    """The worker's second thread: position-dependent draws for chunks the loader sends."""
    while True:
        try:
            requests = inbox.get(timeout=1.0)
        except queue.Empty:
            if not _loader_alive(parent):
                return
            continue
        if requests is None:
            return
        try:
            answer: Any = ("drawn", prep.draw(requests))
        except BaseException:  # noqa: BLE001 - reported to the loader, which raises it
            answer = ("crash", traceback.format_exc())
        if not _put(outbox, answer, parent):
            return


# Environment variables that say where object-store shards are and how to log in to them.
_STORE_ENV = ("AWS_", "MSC_", "AIS_", "GOOGLE_APPLICATION_CREDENTIALS")


def _store_env() -> dict[str, str]:
    """The loader process's object-store settings now. A worker is forked from the fork server,
    which holds the environment of the moment it started (the process's first pool), so an
    endpoint or credentials set later (a test, a notebook, a second run in one process) would
    be missing there, and the worker would ask the default endpoint (AWS itself) instead."""
    return {k: v for k, v in os.environ.items() if k.startswith(_STORE_ENV)}


def _use_store_env(env: dict[str, str]) -> None:
    """Make this worker's object-store settings exactly ``env`` (the loader's)."""
    for k in [k for k in os.environ if k.startswith(_STORE_ENV) and k not in env]:
        del os.environ[k]
    os.environ.update(env)


def _worker_main(prep: HostPrep, chunk_size: int, max_chunk_bytes: int, inbox: Any, outbox: Any, draw_in: Any,
                 draw_out: Any, parent: int, store_env: Optional[dict[str, str]] = None) -> None:
    import threading

    import torch

    if store_env is not None:
        _use_store_env(store_env)

    for s in _PARENT_DECIDES:  # the loader's process decides, then closes the pool
        signal.signal(s, signal.SIG_IGN)
    torch.set_num_threads(1)  # the tokeniser's small tensors; never compete with the trainer
    threading.Thread(target=_serve_draws, args=(prep, draw_in, draw_out, parent), daemon=True).start()
    while True:
        try:
            shard = inbox.get(timeout=1.0)
        except queue.Empty:
            if not _loader_alive(parent):  # the loader process is gone: do not linger
                return
            continue
        if shard is None:
            return
        try:
            if not _read(prep, shard, chunk_size, outbox, parent, max_chunk_bytes):
                return
        except BaseException:  # noqa: BLE001 - reported to the loader, which raises it
            _put(outbox, ("crash", traceback.format_exc()), parent)


def _context() -> mp.context.BaseContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # only takes effect before the server starts
        return ctx
    return mp.get_context("spawn")


@contextlib.contextmanager
def _parent_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while helper processes start: every process
    started meanwhile (resource tracker, fork server, and the workers the server forks)
    inherits the mask, so a signal sent to all of them leaves them running; one meant for this
    process waits until the end of the block (or goes to another thread) and is not lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_DECIDES)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_helpers(ctx: mp.context.BaseContext) -> None:
    """Start multiprocessing's resource tracker and fork server now (inside
    ``_parent_signals_blocked``) rather than at the first queue or process."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    # ... which unblocks SIGINT and SIGTERM in this thread when it starts the tracker: block again.
    signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_DECIDES)
    if ctx.get_start_method() == "forkserver":
        forkserver.ensure_running()


class ReaderPool:
    """``W`` worker processes reading shards ahead; ``read`` yields their items in order."""

    def __init__(self, prep: HostPrep, workers: int, chunk_size: int = READ_CHUNK, ahead: int = 2,
                 queue_chunks: Optional[int] = None, name: str = "reader",
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        if queue_chunks is None:
            queue_chunks = max(2, QUEUE_SAMPLES // max(chunk_size, 1))
        if workers < 1 or chunk_size < 1 or ahead < 1 or queue_chunks < 1 or max_chunk_bytes < 1:
            raise ValueError(f"workers, chunk_size, ahead, queue_chunks and max_chunk_bytes must be >= 1, got "
                             f"{workers}, {chunk_size}, {ahead}, {queue_chunks}, {max_chunk_bytes}")
        ctx = _context()
        self.ahead = ahead
        with _parent_signals_blocked():
            _start_helpers(ctx)
            self._inbox = [ctx.Queue() for _ in range(workers)]
            self._outbox = [ctx.Queue(maxsize=queue_chunks) for _ in range(workers)]
            self._draw_in = [ctx.Queue() for _ in range(workers)]
            self._draw_out = [ctx.Queue() for _ in range(workers)]  # bounded by the loader's lookahead
            self._procs = [
                ctx.Process(target=_worker_main, args=(prep, chunk_size, max_chunk_bytes, self._inbox[w],
                                                       self._outbox[w], self._draw_in[w], self._draw_out[w],
                                                       os.getpid(), _store_env()),
                            name=f"{name}-{w}", daemon=True)
                for w in range(workers)
            ]
            for w, p in enumerate(self._procs):
                p.start()
                # Keep no write end of the worker's result pipes here: when the worker dies, even
                # in the middle of a message, reading gets EOF instead of blocking forever.
                for q in (self._outbox[w], self._draw_out[w]):
                    q._writer.close()  # noqa: SLF001 - the parent never puts to a result queue
        self._reading: list[deque[str]] = [deque() for _ in range(workers)]  # shards each worker holds
        self._drawn = 0  # draw chunks sent, over all calls (chunk c goes to worker c % W)
        self._sent = self._received = 0  # shards requested / fully read back, over all calls
        self._broken = False
        _OPEN_POOLS.add(self)

    @property
    def workers(self) -> int:
        return len(self._procs)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the live workers so far (Linux /proc; 0 elsewhere). Under
        forkserver the workers are not this process's children, so getrusage misses them."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        for p in self._procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def _get(self, w: int, shard: str, draws: bool = False) -> tuple[str, Any]:
        box = self._draw_out[w] if draws else self._outbox[w]
        while True:
            try:
                kind, payload = box.get(timeout=_POLL_S)
            except (queue.Empty, EOFError, OSError) as e:
                closed = not isinstance(e, queue.Empty)  # the pipe closed: the worker is gone
                if closed:
                    self._procs[w].join(timeout=5.0)
                code = self._procs[w].exitcode
                if code is not None or closed:
                    reading = list(self._reading[w])
                    raise ReaderWorkerError(
                        f"loader reader worker {w} (pid {self._procs[w].pid}) died with exit code {code} "
                        f"while {'drawing view parameters for samples of' if draws else 'reading'} shard {shard}"
                        + (f"; it was reading shard(s) {reading}" if draws and reading else "")
                    ) from None
                continue
            if kind == "crash":
                what = "drawing view parameters for samples of" if draws else "reading"
                raise ReaderWorkerError(f"loader reader worker {w} failed while {what} shard {shard}:\n{payload}")
            return kind, payload

    def read(self, slices: list[ShardSlice]) -> Iterator[Item]:
        """The items of ``slices`` in order (sample records with ``HOST`` set, and a ``Damaged``
        after a damaged shard's good samples), as ``dp_split.read_slice`` would give them."""
        if self._broken:
            raise RuntimeError("ReaderPool.read: an earlier read was abandoned mid-way; build a new pool")
        self._broken = True  # until this read completes: its replies would be misaligned
        pending: deque[str] = deque()
        todo = iter(slices)
        while True:
            while len(pending) < self.ahead * self.workers:
                piece = next(todo, None)
                if piece is None:
                    break
                self._inbox[self._sent % self.workers].put(piece)
                self._reading[self._sent % self.workers].append(piece.shard)
                self._sent += 1
                pending.append(piece.shard)
            if not pending:
                break
            shard = pending.popleft()
            w = self._received % self.workers
            while True:
                kind, payload = self._get(w, shard)
                if kind == "end":
                    break
                yield from _unpack(payload)
            self._reading[w].popleft()
            self._received += 1
        self._broken = False

    def draw(self, chunks: Iterator[tuple[Any, str, list[Request]]], inflight: int = 2) -> Iterator[tuple[Any, list[Drawn]]]:
        """``(tag, shard, requests)`` -> ``(tag, HostPrep.draw(requests))`` in order; chunk c is
        drawn by worker c % W (its draw thread), up to ``inflight`` chunks per worker ahead.
        ``shard`` only names the data in an error."""
        pending: deque[tuple[Any, str]] = deque()
        exhausted = False
        sent = received = self._drawn
        while True:
            while not exhausted and len(pending) < inflight * self.workers:
                nxt = next(chunks, None)
                if nxt is None:
                    exhausted = True
                    break
                tag, shard, requests = nxt
                self._draw_in[sent % self.workers].put(requests)
                sent += 1
                pending.append((tag, shard))
            if not pending:
                return
            tag, shard = pending.popleft()
            _, drawn = self._get(received % self.workers, shard, draws=True)
            received += 1
            self._drawn = received
            yield tag, drawn

    def close(self) -> None:
        """Stop the workers (queued work is dropped); safe to call twice."""
        for w, p in enumerate(self._procs):
            if p.is_alive():
                try:
                    self._inbox[w].put(None)
                    self._draw_in[w].put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            p.join(timeout=0.5)
            if p.is_alive():  # still busy with queued shards nobody will read (it ignores SIGTERM)
                p.kill()
                p.join(timeout=2.0)
        _OPEN_POOLS.discard(self)
        for q in self._inbox + self._outbox + self._draw_in + self._draw_out:
            q.cancel_join_thread()
            q.close()
