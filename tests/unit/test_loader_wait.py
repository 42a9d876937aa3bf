"""Loader wait as a fraction of step time: the trainer's tracker, its warning, the report panel."""

from __future__ import annotations

import json

from PIL import Image

from tulip_mega.config.schema import LoggingConfig
from tulip_mega.report import loader_wait_threshold, make_report, panels
from tulip_mega.training.throughput import LoaderWait


def test_warm_up_is_left_out_and_the_warning_comes_once_above_two_percent() -> None:
    assert LoggingConfig().loader_wait_warn == 0.02  # the recipe default the trainer passes
    t = LoaderWait(warmup=2, threshold=0.02)
    t.update(1.0, 0.9)  # warm-up: pipeline build, workers starting
    t.update(1.0, 0.9)
    assert t.fraction is None and t.check() is None
    assert "not measured" in t.summary()[0]
    for _ in range(10):
        t.update(1.0, 0.01)
    assert abs(t.fraction - 0.01) < 1e-12 and t.check() is None
    line, bad = t.summary()
    assert not bad and "1.00%" in line
    for _ in range(10):
        t.update(1.0, 0.05)  # now 0.6 s of 20 s = 3%
    message = t.check()
    assert message is not None and "3.0% of step time over 20 steps" in message and "data.reader_workers" in message
    assert t.check() is None  # once
    line, bad = t.summary()
    assert bad and "3.00%" in line and "data.reader_workers" in line


def test_report_draws_the_loader_wait_panel(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 1.0 / s, "samples_per_sec": 10.0, "data_wait_fraction": 0.01 * (s % 4)}
               for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert panels(records)["loader wait"] == ["data_wait_fraction"]
    with Image.open(make_report(run)) as im:
        assert im.size == (900, 3 * 320)  # losses, throughput, loader wait
    assert loader_wait_threshold(run) == 0.02  # no config.yaml: the default
    (run / "config.yaml").write_text("logging:\n  loader_wait_warn: 0.05\n")
    assert loader_wait_threshold(run) == 0.05  # the run's own threshold
