"""When the EMA teacher of SigLIP 2's self-distillation terms starts and how it moves.

At the start of the step that has `RunLayout.distill_start` steps behind it, every model part
copies its student into its teacher (models/teacher.py). After every applied optimizer step
from then on, the teacher moves towards the student with DINO's cosine momentum schedule
(`loss.distill.teacher_momentum` -> `teacher_momentum_end` at `train.steps`), and the last
stage updates the teacher-output centres from the step's whole global batch. A skipped step
(non-finite loss or gradient) changes neither.
"""

from __future__ import annotations

import logging

from megatron.core import parallel_state

from tulip_mega.config.run_layout import RunLayout
from tulip_mega.models.teacher import teacher_momentum

log = logging.getLogger(__name__)


class TeacherSchedule:
    """The EMA teacher's start and updates for this rank's model parts."""

    def __init__(self, cfg, layout: RunLayout, modules: list) -> None:
        d = cfg.loss.distill
        self.start = layout.distill_start
        self.steps = cfg.train.steps - self.start  # optimizer steps the teacher runs
        self.momenta = (d.teacher_momentum, d.teacher_momentum_end)
        self.center_momentum = d.center_momentum
        self.states = [m.teacher for m in modules if m.teacher is not None]
        self.last_stage = [m.teacher for m in modules if m.teacher is not None and m.post_process]
        self.group = parallel_state.get_data_parallel_group()

    def momentum(self, completed_steps: int) -> float:
        """The EMA momentum after optimizer step number `completed_steps` (1-based)."""
        return teacher_momentum(completed_steps - 1 - self.start, self.steps, *self.momenta)

    def before_step(self, completed_steps: int) -> None:
        """Copy the student into the teacher at the first step the teacher runs."""
        if completed_steps == self.start:
            for state in self.states:
                state.start()
            log.info("step %d: the EMA teacher starts as a copy of the student; self-distillation terms on "
                     "(loss.distill.start_fraction)", completed_steps + 1)

    def after_step(self, completed_steps: int, applied: bool) -> dict[str, float]:
        """Move the teacher and the centres after an applied step; the metrics to log."""
        if not applied:
            for state in self.states:
                state.discard_step()
            return {}
        momentum = self.momentum(completed_steps)
        for state in self.states:
            state.update(momentum)
        for state in self.last_stage:
            state.update_centers(self.center_momentum, self.group)
        return {"teacher_momentum": momentum}
