"""Weights & Biases sink for the metrics logger (`logging.wandb.mode: online | offline`).

Rank 0 only, like metrics.jsonl: every logged step's scalars (the TensorBoard ones, eval
results included) go to `wandb.log(..., step=step)`, and the resolved recipe is the run config.
The run id is kept in `<run folder>/wandb_run_id`, so a resumed run (checkpoint.resume) continues
the same wandb run instead of starting a new one; wandb's own files go to `<run folder>/wandb`.
`wandb` is an optional extra (`pip install tulip-mega[wandb]`); the recipe check refuses a mode
other than `disabled` when it is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

RUN_ID_FILE = "wandb_run_id"


def _new_run_id() -> str:
    """8 random lower-case letters/digits, the shape of wandb's own run ids."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbSink:
    """One wandb run per training run folder."""

    def __init__(self, wandb_cfg, run_dir: Path, run_config: dict[str, Any], default_name: str) -> None:
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else _new_run_id()
        id_file.write_text(run_id + "\n")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or default_name,
            mode=wandb_cfg.mode, dir=str(run_dir), id=run_id, resume="allow", config=run_config,
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def make_wandb_sink(cfg, run_dir: Path, is_rank0: bool) -> Optional[WandbSink]:
    """The sink for rank 0 when `logging.wandb.mode` is not `disabled`, else None."""
    if not is_rank0 or cfg.logging.wandb.mode == "disabled":
        return None
    from tulip_mega.config import config_to_dict

    return WandbSink(cfg.logging.wandb, run_dir, config_to_dict(cfg), default_name=Path(run_dir).name)
