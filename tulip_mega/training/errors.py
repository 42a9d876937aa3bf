"""Why a training run stops for good: each exception carries the exit code `tulip_mega.train`
returns, so a scheduler can tell "fix the recipe or data" from "requeue"."""

from __future__ import annotations


class TrainingHalted(RuntimeError):
    """The run must stop and must not be requeued as is; `exit_code` is what tulip_mega.train returns."""

    exit_code = 1


class NonFiniteTraining(TrainingHalted):
    """train.max_skipped_steps consecutive steps had a non-finite loss or gradient norm."""

    exit_code = 4


class PipelineDataMismatch(TrainingHalted):
    """Pipeline stages of one model replica read different samples in the same step."""

    exit_code = 5


class CacheReplayMismatch(TrainingHalted):
    """train.check_cache: the gradient pass did not reproduce the cached contrastive embeddings."""

    exit_code = 6
