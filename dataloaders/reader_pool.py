"""Reader worker processes: an ordered, bounded, crash-aware map of ``HostPrep.prepare``.

Why processes with a deterministic split: the host work per sample (JSON, JPEG header,
random view parameters, EDA, tokenisation) is Python and holds the GIL, so threads do not
scale it. Chunk c of the position-ordered stream goes to worker ``c % W`` and comes back on
that worker's own queue; each queue is FIFO, so reading chunk c's answer from queue ``c % W``
restores the stream order with no reorder buffer, and no result depends on W (each is a pure
function of its entries). The tar read and the shuffle buffer stay in the loader, sequential,
because the buffer's order depends on every item before it.

- Start method: ``forkserver`` (the trainer holds torch / gloo threads, under which ``fork``
  is unsafe) with this module preloaded, so a worker starts in milliseconds instead of
  re-importing torch; ``spawn`` where forkserver does not exist.
- Bounded: at most ``inflight`` chunks per worker are outstanding, so a run never reads far
  ahead (memory) and closing the iterator stops the workers promptly.
- Worker death (OOM kill, segfault) is not a hang: the loader waits with a timeout and checks
  ``Process.exitcode``; it raises naming the worker and the shards of the chunks it held. An
  exception inside a worker comes back as a message with its traceback and is raised the same
  way. Workers exit by themselves when the loader process is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dataloaders.host_prep import Entry, HostPrep, Result

__all__ = ["ReaderPool", "ReaderWorkerError"]

_POLL_S = 0.2  # how often a waiting loader checks that its workers are alive


class ReaderWorkerError(RuntimeError):
    """A reader worker died or raised; the message names the worker and the shards it held."""


@dataclass
class _Crash:
    """An exception raised in a worker, sent back instead of a result."""

    text: str


def _shards_of(entries: list[Entry]) -> list[str]:
    out: list[str] = []
    for _, _, item in entries:
        if item is None:
            continue
        shard = item.shard if not isinstance(item, dict) else item.get("__shard__", "?")
        if shard not in out:
            out.append(shard)
    return out


def _worker_main(prep: HostPrep, inbox: Any, outbox: Any, parent: int) -> None:
    import torch

    torch.set_num_threads(1)  # the tokeniser's small tensors; never compete with the trainer
    while True:
        try:
            msg = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the loader process is gone: do not linger
                return
            continue
        if msg is None:
            return
        try:
            out: Any = prep.prepare(msg)
        except BaseException:  # noqa: BLE001 - reported to the loader, which raises it
            out = _Crash(traceback.format_exc())
        outbox.put(out)


def _context() -> mp.context.BaseContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # only takes effect before the server starts
        return ctx
    return mp.get_context("spawn")


class ReaderPool:
    """``W`` worker processes running ``prep.prepare`` on chunks, answers in chunk order."""

    def __init__(self, prep: HostPrep, workers: int, inflight: int = 2, name: str = "reader") -> None:
        if workers < 1 or inflight < 1:
            raise ValueError(f"workers and inflight must be >= 1, got {workers}, {inflight}")
        ctx = _context()
        self.inflight = inflight
        self._inbox = [ctx.Queue() for _ in range(workers)]
        self._outbox = [ctx.Queue() for _ in range(workers)]
        self._procs = [
            ctx.Process(target=_worker_main, args=(prep, self._inbox[w], self._outbox[w], os.getpid()),
                        name=f"{name}-{w}", daemon=True)
            for w in range(workers)
        ]
        for p in self._procs:
            p.start()

    @property
    def workers(self) -> int:
        return len(self._procs)

    def _get(self, w: int, held: list[Entry]) -> list[Result]:
        while True:
            try:
                out = self._outbox[w].get(timeout=_POLL_S)
            except queue.Empty:
                code = self._procs[w].exitcode
                if code is not None:
                    raise ReaderWorkerError(
                        f"loader reader worker {w} (pid {self._procs[w].pid}) died with exit code {code} "
                        f"while preparing samples from shard(s) {_shards_of(held)}"
                    ) from None
                continue
            if isinstance(out, _Crash):
                raise ReaderWorkerError(
                    f"loader reader worker {w} failed on samples from shard(s) {_shards_of(held)}:\n{out.text}"
                )
            return out

    def map(self, chunks: Iterator[list[Entry]]) -> Iterator[tuple[list[Entry], list[Result]]]:
        """(chunk, results) in the order of ``chunks``, computed ahead by the workers."""
        pending: deque[list[Entry]] = deque()
        sent = received = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.inflight * self.workers:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                self._inbox[sent % self.workers].put(chunk)
                pending.append(chunk)
                sent += 1
            if not pending:
                return
            chunk = pending.popleft()
            results = self._get(received % self.workers, chunk)
            received += 1
            yield chunk, results

    def close(self) -> None:
        """Stop the workers (queued work is dropped); safe to call twice."""
        for w, p in enumerate(self._procs):
            if p.is_alive():
                try:
                    self._inbox[w].put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            p.join(timeout=0.5)
            if p.is_alive():  # still busy with queued chunks nobody will read
                p.terminate()
                p.join(timeout=2.0)
        for q in self._inbox + self._outbox:
            q.cancel_join_thread()
            q.close()
