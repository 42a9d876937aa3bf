"""`torchrun --nproc_per_node N -m tulip_mega.train RECIPE [key=value ...] [--resume]`.

Also runs under a plain `srun` (rank/world from SLURM's environment) and as a single process.

Exit codes (the SLURM scripts in slurm/ act on them):
  0   the run reached train.steps;
  75  (EX_TEMPFAIL) stopped early after checkpointing: a stop signal (SIGUSR1/SIGTERM, handled
      from the start of main: one during start-up stops before the first step, with nothing
      new to save) or run.max_wall_time_minutes. Relaunching with --resume continues;
  2   config error (nothing was run);
  3   checkpoint error;
  4   train.max_skipped_steps consecutive steps had a non-finite loss or gradient norm (each was
      skipped, so the weights and checkpoints are those of the last finite step);
  5   pipeline stages of a model replica read different samples (a data / loader bug);
  6   train.check_cache: the gradient pass did not reproduce the cached contrastive embeddings.
Only 75 is requeued by slurm/common.sh: 4, 5 and 6 would fail the same way again.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from tulip_mega.training.signals import PreemptionSignal

EXIT_FINISHED = 0
EXIT_CONFIG_ERROR = 2
EXIT_CHECKPOINT_ERROR = 3
EXIT_NON_FINITE = 4  # = tulip_mega.training.errors.NonFiniteTraining.exit_code
EXIT_DATA_MISMATCH = 5  # = tulip_mega.training.errors.PipelineDataMismatch.exit_code
EXIT_CACHE_MISMATCH = 6  # = tulip_mega.training.errors.CacheReplayMismatch.exit_code
EXIT_STOPPED_EARLY = 75  # EX_TEMPFAIL from sysexits.h: "try again later" (= requeue and --resume)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tulip-mega train",
        description="Train a TULIP / SigLIP model from a YAML recipe with key=value overrides.",
        epilog="List every recipe key with: tulip-mega config --keys",
    )
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=50")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tulip_mega.training.signals import PreemptionSignal

    # First, before the imports, process groups, model build and restore (minutes at 512
    # ranks): a stop signal from then on is recorded and acted on at the first step boundary.
    with PreemptionSignal() as stop_signal:
        return _main(argv, stop_signal)


def _main(argv: Optional[Sequence[str]], stop_signal: PreemptionSignal) -> int:
    args = build_parser().parse_args(argv)
    from tulip_mega.training.metrics import capture_warnings_early

    capture_warnings_early()  # megatron's import-time TE/Apex warnings go to the run's debug.log
    from tulip_mega.config import ConfigError, load_config

    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    try:
        cfg = load_config(args.recipe, overrides)
        from tulip_mega.launch import check_launch
        from tulip_mega.parallel.init import launch_env

        layout = check_launch(cfg, launch_env().world_size)
    except ConfigError as e:
        print(f"tulip-mega: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # megatron-core 0.16's own TransformerConfig default triggers this deprecation notice.
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    from tulip_mega.training.checkpoint import CheckpointError
    from tulip_mega.training.loop import train
    from tulip_mega.training.errors import TrainingHalted

    try:
        summary = train(cfg, stop_signal=stop_signal, layout=layout)
    except CheckpointError as e:
        print(f"tulip-mega: checkpoint error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR
    except TrainingHalted as e:
        print(f"tulip-mega: training stopped: {e}", file=sys.stderr)
        return e.exit_code
    from tulip_mega.parallel.init import destroy_parallel

    destroy_parallel()
    return EXIT_FINISHED if summary.get("finished", True) else EXIT_STOPPED_EARLY


if __name__ == "__main__":
    sys.exit(main())
