"""Warn when a contrastive term sits on the loss of a model that has learned nothing.

Each step reports, beside every contrastive term `loss/<term>`, `chance/<term>`: the loss a
model that gives every pair the same logit gets at this contrastive batch
(tulip_mega/losses/chance.py). A term within `tolerance` (1%) of it for
`logging.plateau_steps` consecutive steps after the LR warm-up has not started to learn:
typically the contrastive batch is too small for the temperature / bias initialisation, or
the learning rate is too low to move the bias in the run's budget. The warning says which
term, for how long, and what to look at; it repeats only after the term has left the plateau.
"""

from __future__ import annotations

from typing import Optional

from tulip_mega.config.streams import CONTRASTIVE_TERMS


class PlateauWatch:
    def __init__(self, warmup_steps: int, patience: int, tolerance: float = 0.01) -> None:
        self.warmup_steps, self.patience, self.tolerance = warmup_steps, patience, tolerance
        self._streak: dict[str, int] = {}
        self._warned: set[str] = set()

    def update(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Feed one step's metrics; returns the warnings to log now (usually none)."""
        if self.patience <= 0:
            return []
        out = []
        for key, chance in metrics.items():
            if not key.startswith("chance/"):
                continue
            term = key.split("/", 1)[1]
            if term not in CONTRASTIVE_TERMS:  # the EMA-teacher terms' chance (log K) is a reference only
                continue
            value: Optional[float] = metrics.get(f"loss/{term}")
            on_plateau = (step > self.warmup_steps and value is not None and chance > 0
                          and abs(value - chance) <= self.tolerance * chance)
            if not on_plateau:
                self._streak[term] = 0
                self._warned.discard(term)
                continue
            self._streak[term] = self._streak.get(term, 0) + 1
            if self._streak[term] >= self.patience and term not in self._warned:
                self._warned.add(term)
                out.append(
                    f"step {step}: loss/{term} = {value:.4f} has stayed within {100 * self.tolerance:.0f}% of "
                    f"{chance:.4f}, the loss of a model that gives every pair the same logit at this contrastive "
                    f"batch, for {self._streak[term]} steps after warm-up: it is not learning yet. Check the "
                    "contrastive batch (train.global_batch_size, loss.contrastive_batch), model.bias_init / "
                    "model.temperature_init for that batch, and optim.lr (docs/losses.md, 'Plateau').")
        return out
