"""`tulip-mega eval CHECKPOINT --benchmarks ... --root DIR`: the shipped TULIP paper suite
(tulip_mega/eval/suites/tulip_paper.yaml) on sets written in their published formats
(tests/eval_sets.py), two of them left out: one JSON, one markdown table, the missing sets
named with where they were expected and in which format."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval_sets import write_imagenet, write_mmvp, write_wds_classification, write_wds_retrieval
from tulip_mega.config import ConfigError
from tulip_mega.eval.suite import load_suite, markdown_table, select

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tulip_mega.cli", "eval", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_shipped_suite_gives_one_table_and_names_missing_sets(eval_checkpoint, tmp_path):
    root = tmp_path / "benchmarks"
    write_imagenet(root / "imagenet" / "val")
    write_wds_classification(root / "wds_imagenetv2")
    write_wds_retrieval(root / "wds_mscoco_captions")
    write_mmvp(root / "MMVP_VLM")
    t0 = time.perf_counter()
    proc = _cli(eval_checkpoint, "--benchmarks", "all", "--root", str(root), "--out", str(tmp_path / "suite.json"),
                "eval.batch_size=500")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout, f"{seconds:.1f} s")
    results = json.loads((tmp_path / "suite.json").read_text())["benchmarks"]
    assert sorted(results) == ["coco", "flickr30k", "imagenet1k", "imagenetv2", "mmvp", "objectnet"]
    assert results["objectnet"]["missing"] == (
        f"objectnet: not found at {root / 'wds_objectnet'} (expected zeroshot clip_benchmark: "
        "<path>/<split>/nshards.txt + <path>/<split>/0.tar ... (CLIP_benchmark webdataset))")
    assert "missing" in results["flickr30k"]
    assert results["imagenet1k"]["metrics"]["eval/zeroshot/samples"] == 1000
    assert results["coco"]["metrics"]["eval/retrieval/captions"] == 168
    assert results["mmvp"]["metrics"]["eval/mmvp/pairs"] == 9
    table = (tmp_path / "suite.md").read_text()
    assert table == proc.stdout  # the same table printed and written
    assert table.splitlines()[0].startswith("| benchmark | task | format | top-1 |") and len(table.splitlines()) == 8
    coco = results["coco"]["metrics"]
    assert f"| coco | retrieval | clip_benchmark |  |  | {100 * coco['eval/retrieval/text_to_image_r1']:.1f} |" in table
    # Each suite row is what a single `tulip-mega eval` on that set gives.
    single = _cli(eval_checkpoint, "--task", "zeroshot", "--format", "clip_benchmark", "--data",
                  str(root / "wds_imagenetv2"), "--out", str(tmp_path / "one.json"), "eval.batch_size=500")
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())["metrics"]
    for key, value in one.items():
        if key != "eval/seconds":
            assert results["imagenetv2"]["metrics"][key] == value, key


def test_suite_file_errors(tmp_path):
    sets = load_suite()
    assert sets["coco"] == {"task": "retrieval", "format": "clip_benchmark", "path": "wds_mscoco_captions"}
    chosen = select(sets, "coco, mmvp", "/data")
    assert [(b.name, b.format, b.path) for b in chosen] == [("coco", "clip_benchmark", "/data/wds_mscoco_captions"),
                                                            ("mmvp", "mmvp", "/data/MMVP_VLM")]
    with pytest.raises(ConfigError, match=r"unknown \['cifar'\]; the suite has imagenet1k, imagenetv2"):
        select(sets, "coco,cifar", "/data")
    bad = tmp_path / "s.yaml"
    bad.write_text("benchmarks:\n  x: {task: retrieval, format: imagenet, path: p}\n")
    with pytest.raises(ConfigError, match="benchmark 'x': format 'imagenet' is not one of pairs, clip_benchmark"):
        load_suite(str(bad))
    with pytest.raises(ConfigError, match="suite file .*nope.yaml does not exist"):
        load_suite(str(tmp_path / "nope.yaml"))
    table = markdown_table({"a": {"task": "zeroshot", "format": "imagenet",
                                  "metrics": {"eval/zeroshot/top1": 0.5, "eval/zeroshot/top5": 0.75,
                                              "eval/zeroshot/samples": 8.0}}})
    assert table.splitlines()[2] == "| a | zeroshot | imagenet | 50.0 | 75.0 |  |  |  |  |  |  | 8 |"
