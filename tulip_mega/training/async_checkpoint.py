"""`checkpoint.async_save`: write checkpoints in the background while training continues.

Uses megatron `dist_checkpointing`'s own async machinery: `dist_checkpointing.save(...,
async_sharded_save=True)` returns an `AsyncRequest` (the common state, step, config and
metadata plan are written at once; the tensor shards are the request), which an
`AsyncCallsQueue` runs in a forked writer process per save (`TemporalAsyncCaller`: the fork
is the snapshot, so the optimizer steps that follow cannot leak into it; on a GPU the shards
are first copied to host memory). The queue is polled every step (one integer all-reduce);
when every rank's writer has finished, the request's finalisation runs on every rank:
megatron writes the checkpoint's metadata, then training/checkpoint.py `_publish` renames
`step_N.partial` to `step_N` and replaces `latest`. So publishing stays atomic and happens only
after the write: a kill during an async save leaves `latest` naming the previous checkpoint.

At most one save is in flight: a new save first waits for the previous one. The end of
training (and a stop on a signal or the wall-time limit) waits for the save to be published.

Metrics (reported once a save is published): `checkpoint/save_s`, from the start of the save
to its publication, and `checkpoint/wait_s`, the time training was blocked by saving (setting
the save up, the fork, and waiting for a previous save); for a synchronous save both are the
save's duration.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class CheckpointWriter:
    """Saves checkpoints synchronously or (async_save=True) in the background; one per run."""

    def __init__(self, async_save: bool) -> None:
        self.async_save = async_save
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)
        self._pending: Optional[tuple[Path, float]] = None  # (path, start time) of the save in flight
        self._waited = 0.0  # training time blocked by the save in flight so far
        self._report: dict[str, float] = {}
        self.last_published: Optional[Path] = None

    def save(self, root: Path, step: int, model, optimizer, scheduler, loader_state, model_config: dict,
             keep_last: int, wait: bool = False) -> Path:
        """Start a save (collective); with `wait` (or synchronous saving) return only once it is
        published. Returns the checkpoint's final path."""
        from tulip_mega.training.checkpoint import save_checkpoint

        t0 = time.perf_counter()
        waited_before = self._finish() if self._pending is not None else 0.0
        t1 = time.perf_counter()
        path = save_checkpoint(root, step, model, optimizer, scheduler, loader_state, model_config, keep_last,
                               async_queue=self._queue)
        if self._queue is None:
            elapsed = time.perf_counter() - t1
            self._report = {"checkpoint/save_s": elapsed, "checkpoint/wait_s": elapsed + waited_before}
            self.last_published = path
            return path
        self._pending = (path, t1)
        self._waited = time.perf_counter() - t1 + waited_before
        if waited_before:
            log.info("waited %.2f s for the previous checkpoint before saving step %d", time.perf_counter() - t0, step)
        if wait:
            self._finish()
        return path

    def poll(self) -> None:
        """Finalise a save whose writes are done on every rank (collective; call every step)."""
        if self._queue is not None and self._pending is not None:
            t = time.perf_counter()
            done = self._queue.maybe_finalize_async_calls(blocking=False)
            self._waited += time.perf_counter() - t
            if done:
                self._published()

    def take_report(self) -> dict[str, float]:
        """The metrics of the newest save published since the last call (else {})."""
        report, self._report = self._report, {}
        return report

    def _finish(self) -> float:
        """Block until the save in flight is published; returns the seconds waited."""
        t = time.perf_counter()
        self._queue.maybe_finalize_async_calls(blocking=True)
        waited = time.perf_counter() - t
        self._waited += waited
        self._published()
        return waited

    def _published(self) -> None:
        path, start = self._pending
        self._report = {"checkpoint/save_s": time.perf_counter() - start, "checkpoint/wait_s": self._waited}
        log.info("published checkpoint %s (%.2f s after the save started; training waited %.2f s)",
                 path, self._report["checkpoint/save_s"], self._waited)
        self.last_published = path
        self._pending, self._waited = None, 0.0

    def close(self) -> dict[str, float]:
        """Publish the save in flight, if any (collective). Returns the newest save's metrics."""
        if self._pending is not None:
            self._finish()
        return self.take_report()
