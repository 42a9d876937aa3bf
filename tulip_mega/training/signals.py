"""Preemption: a signal asks the run to checkpoint at the next step boundary and stop.

SLURM sends a warning signal before a time limit or preemption (`--signal=B:USR1@300`,
forwarded to the tasks by the sbatch script), and schedulers send SIGTERM before killing.
The handler only records the signal; the training loop checks, at each step boundary, whether
ANY rank received one (ranks must agree, or the collective save would hang), saves a
checkpoint and returns, so the next job resumes with no step lost or repeated.

One `PreemptionSignal` covers the whole run: `tulip_mega.train.main` installs it before any
heavy import, so a signal during process-group set-up, model build or checkpoint restore
(minutes at 512 ranks) is recorded and acted on at the first step boundary instead of killing
the rank with an exit code the batch script does not requeue.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Iterable, Optional

log = logging.getLogger("tulip_mega")

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


class PreemptionSignal:
    """Handlers that note the first stop signal received; a context manager that installs them
    on entry and puts the previous handlers back on exit."""

    def __init__(self, names: Iterable[str] = DEFAULT_SIGNALS) -> None:
        self.signals = [getattr(signal, n) for n in names]
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: will checkpoint and stop at the next step boundary",
                        signal.Signals(signum).name)

    def __enter__(self) -> "PreemptionSignal":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()
