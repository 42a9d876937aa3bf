"""Metrics: metrics.jsonl (one JSON object per logged step), TensorBoard, optionally Weights &
Biases (training/wandb_logger.py), and a progress line.

Only rank 0 writes. Every logged step carries step, loss and each loss term, lr, grad_norm,
samples_per_sec, logit_scale and logit_bias (plus whatever else the step reports), and from
the loop: tokens_per_sec, model_flops_per_sample, tflops_per_device, mfu (GPUs in the peak
table only), step_time, data_wait, peak_memory_gib, data/samples, data/skipped (with a mixture also
data/samples/<name> and data/skipped/<name> per dataset, and their shares in the progress line); eval steps
add eval/<task>/<metric>.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("tulip_mega")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere."""

    def __init__(
        self, run_dir: Path, total_steps: int, enabled: bool, tensorboard: bool, start_step: int = 0,
        wandb=None,
    ) -> None:
        self.enabled = enabled
        self._wandb = wandb  # a tulip_mega.training.wandb_logger.WandbSink (rank 0) or None
        self.total_steps = total_steps
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard"
        self._jsonl = None
        self._tb = None
        self._t_start = time.perf_counter()
        self._steps_timed = 0
        if not enabled:
            return
        _drop_records_after(self.jsonl_path, start_step)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.tb_dir))

    def log(self, step: int, metrics: dict[str, float], start_step: int) -> None:
        """Record one step's metrics (step is 1-based: the number of completed steps)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(step, scalars)
        elapsed = time.perf_counter() - self._t_start
        done = step - start_step
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        speed = ""
        if "tflops_per_device" in metrics:
            speed = f" | {metrics['tflops_per_device']:.3g} TFLOP/s"
            if metrics.get("mfu") is not None:
                speed += f" MFU {100 * metrics['mfu']:.1f}%"
        # Every contrastive and EMA-teacher term beside the loss of a model that has learned nothing (chance).
        terms = "".join(f" | {k[7:]} {metrics.get('loss/' + k[7:], float('nan')):.3f} (chance {v:.3f})"
                        for k, v in metrics.items() if k.startswith("chance/"))
        # A mixture's realised shares of the samples so far (compare with the recipe's weights).
        drawn = {k[13:]: v for k, v in metrics.items() if k.startswith("data/samples/")}
        total = sum(drawn.values())
        if total:
            speed += " | mix " + " ".join(f"{name} {v / total:.3f}" for name, v in drawn.items())
        log.info(
            "step %d/%d | loss %.4f%s | lr %.2e | grad_norm %.3f | %.1f samples/s%s | t %.2f b %.2f | ETA %s",
            step,
            self.total_steps,
            metrics.get("loss", float("nan")),
            terms,
            metrics.get("lr", float("nan")),
            metrics.get("grad_norm", float("nan")),
            metrics.get("samples_per_sec", float("nan")),
            speed,
            metrics.get("logit_scale", float("nan")),
            metrics.get("logit_bias", float("nan")),
            _fmt_duration(eta),
        )

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def _jsonable(v):
    if isinstance(v, float) and v != v:  # NaN is not valid JSON
        return None
    return v


def _drop_records_after(path: Path, step: int) -> None:
    """A run resumed from step N re-does the steps after N: drop their old records (written
    before the interruption) so metrics.jsonl holds each step once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl (used by tests and reports)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


DEBUG_LOG_NAME = "debug.log"
# Library chatter that is not a fact about the run: megatron's INFO records (the
# parameter-bucket listing) and Python warnings (Transformer Engine / Apex "not installed",
# deprecation notices), which megatron repeats once per importing module on every rank.
# megatron's own WARNING and ERROR records still reach the console.


class _NotLibraryChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("py.warnings"):
            return False
        return not (record.name.startswith("megatron") and record.levelno < logging.WARNING)


def capture_warnings_early() -> None:
    """Route Python warnings into logging from now on and hold them in memory until
    `setup_logging` names the debug log (megatron warns at import, before the run folder is
    known). Call first thing in an entry point."""
    logging.captureWarnings(True)
    held = logging.getLogger("py.warnings")
    if not any(isinstance(h, logging.handlers.MemoryHandler) for h in held.handlers):
        held.addHandler(logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1))
    held.propagate = False


def setup_logging(rank: int, level: Optional[int] = None, debug_log: Optional[Path] = None) -> None:
    """Rank 0 logs at INFO, other ranks at WARNING, with the rank in the prefix.

    With `debug_log` (the run folder's debug.log; rank r > 0 writes debug.rank<r>.log) every
    record at DEBUG and up also goes there, and megatron's records and Python warnings go
    only there: the console shows the run's own lines.
    """
    level = level if level is not None else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if debug_log is None:
        return
    logging.captureWarnings(True)
    debug_log = Path(debug_log)
    if rank:
        debug_log = debug_log.with_name(f"{debug_log.stem}.rank{rank}{debug_log.suffix}")
    debug_log.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in root.handlers:
        h.setLevel(level)
        h.addFilter(_NotLibraryChatter())
    file_handler = logging.FileHandler(debug_log)
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(file_handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("megatron").setLevel(logging.INFO)
    held = logging.getLogger("py.warnings")
    for h in list(held.handlers):
        if isinstance(h, logging.handlers.MemoryHandler):
            h.setTarget(file_handler)
            h.flush()
            held.removeHandler(h)
    held.propagate = True
