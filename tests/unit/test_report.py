"""`tulip-mega report RUN_DIR`: a PNG of the loss terms, lr, throughput and eval curves."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tulip_mega.cli import main as cli_main
from tulip_mega.report import make_report, panels


def _write_run(run_dir, steps: int = 30) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        r = {"step": step, "loss": 5.0 / step, "loss/image_text": 4.0 / step, "loss/mae": 1.0 / step,
             "lr": 1e-3 * min(1.0, step / 10), "grad_norm": 1.0, "samples_per_sec": 100.0 + step,
             "tflops_per_device": 0.5, "mfu": None, "data/skipped": 0.0}
        if step % 10 == 0:
            r.update({"eval/zeroshot/top1": step / 100, "eval/zeroshot/samples": 128.0, "eval/seconds": 1.0,
                      "eval/retrieval/image_to_text_r1": step / 200})
        records.append(r)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_panels_pick_every_logged_term(tmp_path):
    records = _write_run(tmp_path / "run")
    assert panels(records) == {
        "losses": ["loss", "loss/image_text", "loss/mae"],
        "lr": ["lr"],
        "throughput": ["samples_per_sec", "tflops_per_device"],
        "eval": ["eval/zeroshot/top1", "eval/retrieval/image_to_text_r1"],  # counts and timings left out
    }
    assert "eval" not in panels(records[:9])  # no eval yet: no empty panel


def test_report_writes_a_png_with_one_row_per_panel(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    assert cli_main(["report", str(run)]) == 0
    png = run / "report.png"
    with Image.open(png) as im:
        assert im.format == "PNG"
        width, height = im.size
        # 4 panels at 3.2 inches each, 100 dpi
        assert (width, height) == (900, 1280)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # curves and text were drawn, not a blank canvas

    out = make_report(run, tmp_path / "elsewhere" / "r.png")
    assert out.is_file()


def test_report_errors_name_the_file(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        make_report(tmp_path / "empty")
