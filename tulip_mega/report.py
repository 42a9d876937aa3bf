"""`tulip-mega report RUN_DIR`: one PNG with a run's curves, for a quick look without TensorBoard.

Panels (each drawn only when the run logged something for it):
  losses      `loss` and every `loss/<term>` (log scale when all positive)
  lr          the learning rate
  throughput  samples/s (left axis) and TFLOP/s per device (right axis); MFU in the legend
  loader wait `data_wait_fraction`: time the step waited for data / step time, in %, with the
              line above which the trainer warns (the run's logging.loader_wait_warn, 2% by default)
  eval        every `eval/<task>/<metric>` except sample counts and timings
Reads metrics.jsonl (and config.yaml for the loader-wait threshold), so it works on a copied
run folder and while a run is going.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union


SKIP_EVAL = ("samples", "seconds")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def panels(records: list[dict]) -> dict[str, list[str]]:
    """Which metric keys go into which panel (empty panels are dropped)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    out = {
        "losses": [k for k in keys if k == "loss" or k.startswith("loss/")],
        "lr": [k for k in keys if k == "lr"],
        "throughput": [k for k in keys if k in ("samples_per_sec", "tflops_per_device")],
        "loader wait": [k for k in keys if k == "data_wait_fraction"],
        "eval": [k for k in keys if k.startswith("eval/") and k.rsplit("/", 1)[-1] not in SKIP_EVAL],
    }
    return {name: ks for name, ks in out.items() if ks}


def read_records(run_dir: Union[str, Path]) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: RUN_DIR must be a run folder (runs/<name>/) of tulip-mega train")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records yet")
    return records


def make_report(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None) -> Path:
    """Draw the panels of RUN_DIR/metrics.jsonl into a PNG (default RUN_DIR/report.png)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_records(run_dir)
    layout = panels(records)
    out = Path(out) if out else Path(run_dir) / "report.png"
    fig, axes = plt.subplots(len(layout), 1, figsize=(9, 3.2 * len(layout)), sharex=True, squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], layout.items()):
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if name == "throughput":
            _throughput(ax, records, keys)
            continue
        if name == "loader wait":
            _loader_wait(ax, records, loader_wait_threshold(run_dir))
            continue
        positive = True
        for k in keys:
            xs, ys = _series(records, k)
            positive &= all(y > 0 for y in ys)
            ax.plot(xs, ys, label=k, marker="o" if name == "eval" else None, markersize=3)
        if name == "losses" and positive:
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{Path(run_dir).resolve().name}: steps {records[0]['step']}-{records[-1]['step']}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _throughput(ax, records: list[dict], keys: list[str]) -> None:
    if "samples_per_sec" in keys:
        xs, ys = _series(records, "samples_per_sec")
        ax.plot(xs, ys, color="tab:blue", label="samples/s")
        ax.set_ylabel("samples/s")
        ax.legend(fontsize=7, loc="upper left")
    if "tflops_per_device" in keys:
        twin = ax.twinx()
        xs, ys = _series(records, "tflops_per_device")
        _, mfu = _series(records, "mfu")
        label = "TFLOP/s per device" + (f" (last MFU {100 * mfu[-1]:.1f}%)" if mfu else "")
        twin.plot(xs, ys, color="tab:orange", linestyle="--", label=label)
        twin.set_ylabel("TFLOP/s")
        twin.legend(fontsize=7, loc="upper right")


def loader_wait_threshold(run_dir: Union[str, Path]) -> float:
    """The run's logging.loader_wait_warn (its config.yaml), else the schema default."""
    from tulip_mega.config.schema import LoggingConfig

    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        import yaml

        value = ((yaml.safe_load(path.read_text()) or {}).get("logging") or {}).get("loader_wait_warn")
        if isinstance(value, (int, float)):
            return float(value)
    return LoggingConfig().loader_wait_warn


def _loader_wait(ax, records: list[dict], threshold: float) -> None:
    xs, ys = _series(records, "data_wait_fraction")
    ax.plot(xs, [100 * y for y in ys], color="tab:red", label="waiting for data (% of step time)")
    ax.axhline(100 * threshold, color="grey", linestyle=":", label=f"{threshold:.0%}: the trainer warns")
    ax.set_ylabel("% of step time")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="best")

