"""Non-finite step skipping: a step whose loss or gradient norm is not finite changes nothing
(no weight, optimizer state or LR-schedule change), is logged and counted, and too many in a
row stop the run, since the weights would never move again."""

from __future__ import annotations

import logging
import math
from typing import Sequence

from tulip_mega.training.errors import NonFiniteTraining
from tulip_mega.training.optimizer import guarded_step

log = logging.getLogger("tulip_mega")


class SkipGuard:
    """Applies optimizer steps through `guarded_step` and counts the skipped ones."""

    def __init__(self, max_skipped_steps: int) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0  # this run
        self.consecutive_skips = 0

    def apply(self, optimizer, scheduler, metrics: dict[str, float], loss_keys: Sequence[str],
              step: int) -> dict[str, float]:
        """Optimizer step number `step` (1-based) unless a `loss_keys` metric or the gradient
        norm is not finite; the LR schedule advances only with the weights. Returns grad_norm,
        lr and train/skipped_steps. Raises NonFiniteTraining after train.max_skipped_steps
        consecutive skips."""
        loss_finite = all(math.isfinite(metrics[k]) for k in loss_keys)
        applied, grad_norm = guarded_step(optimizer, loss_finite)
        out = {"grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}
        if applied:
            scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            bad = [f"{k}={metrics[k]}" for k in loss_keys if not math.isfinite(metrics[k])]
            if not math.isfinite(grad_norm):
                bad.append(f"grad_norm={grad_norm}")
            self._skip(step, bad)
        out["train/skipped_steps"] = float(self.skipped_steps)
        return out

    def _skip(self, step: int, bad: list[str]) -> None:
        """Count and log a skipped step; stop the run after too many in a row."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        log.warning("step %d skipped: non-finite %s; no weight or optimizer state changed "
                    "(%d consecutive, %d this run; the run stops after train.max_skipped_steps=%d in a row)",
                    step, ", ".join(bad), self.consecutive_skips, self.skipped_steps, self.max_skipped_steps)
        if self.consecutive_skips >= self.max_skipped_steps:
            raise NonFiniteTraining(
                f"{self.consecutive_skips} consecutive steps (up to step {step}) had a non-finite "
                f"loss or gradient norm ({', '.join(bad)}); the weights are those of the last finite step. "
                "Lower optim.lr, check the data, or resume from an earlier checkpoint")
