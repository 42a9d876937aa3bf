"""Both directions with CLIP_benchmark (`clip-benchmark`, a dev dependency).

A debug-size checkpoint is exported to open_clip; `clip_benchmark eval` runs on the export in a
fresh process that never imports this project (open_clip's own `local-dir:` loading), and
`tulip-mega eval` runs on the checkpoint, on the same sets written here in the published layouts:
a CLIP_benchmark webdataset classification set and retrieval set (1-4 captions per image), and
an ImageNet-1k ImageFolder tree (`<root>/val/<wnid>/`, what clip_benchmark's
`imagenet1k-unverified` reads, with its default OpenAI class names and 80 templates, which equal
the ones shipped in tulip_mega/eval/data). Zero-shot top-1 and retrieval recall agree within 1%
absolute (the issue's bar; measured: equal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("clip_benchmark")
pytest.importorskip("open_clip")

from test_eval_formats import COLOURS, FIELDS, _image, _tar  # noqa: E402
from tulip_mega.parallel.spawn import run_distributed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUT = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1"]


def checkpoint_worker(run: str, tokenizer: str) -> str:
    """A randomly initialised debug model saved as a training checkpoint with its config.yaml."""
    import warnings

    warnings.filterwarnings("ignore")
    from harness import build_train_step
    from tulip_mega.config.load import save_config
    from tulip_mega.training.checkpoint import model_shape, save_checkpoint

    cfg, model, opt, sch, _ = build_train_step(LAYOUT + [f"data.tokenizer={tokenizer}"])
    save_config(cfg, Path(run) / "config.yaml")
    return str(save_checkpoint(Path(run) / "checkpoints", 0, model, opt, sch, None, model_shape(cfg)))


def _write_wds(root: Path, samples: list[dict], per_shard: int) -> None:
    (root / "test").mkdir(parents=True)
    shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for i, part in enumerate(shards):
        _tar(root / "test" / f"{i}.tar", part)
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")


def write_sets(root: Path) -> None:
    names = list(COLOURS)
    cls = [{"__key__": f"c{n:05d}", FIELDS[n % 4]: _image(COLOURS[names[n % 3]], n, FIELDS[n % 4]),
            "cls": str(n % 3).encode()} for n in range(150)]
    _write_wds(root / "cls", cls, per_shard=64)
    (root / "cls" / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "cls" / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\na {c} thing\n")
    ret = []
    for n in range(60):
        name = names[n % 3]
        captions = [f"a {name} picture", f"something {name}", f"{name} noise number {n}", "a photo"][: 1 + n % 4]
        ret.append({"__key__": f"r{n:05d}", FIELDS[n % 4]: _image(COLOURS[name], 500 + n, FIELDS[n % 4]),
                    "txt": "\n".join(captions).encode()})
    _write_wds(root / "ret", ret, per_shard=25)
    (root / "ret" / "dataset_type.txt").write_text("retrieval\n")
    val = root / "imagenet1k-unverified" / "val"
    for c in range(1000):
        (val / f"n{c:08d}").mkdir(parents=True)
    for i in range(200):
        c = (i % 10) * 97  # ten classes spread over the index range
        colour = tuple(int(v) for v in (c % 256, (3 * c) % 256, (7 * c) % 256))
        (val / f"n{c:08d}" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_image(colour, 900 + i, "jpeg"))


def _clip_benchmark(export: Path, dataset: str, root: str, task: str, out: Path) -> dict:
    """`clip_benchmark eval` on the export in a fresh process (no project import, no PYTHONPATH)."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not Path(p, "tulip_mega").is_dir()]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": os.pathsep.join(keep)}
    code = ("import sys; from clip_benchmark.cli import main; rc = main(); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('tulip_mega', 'dataloaders')]; sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "eval", "--model", f"local-dir:{export}", "--pretrained", "",
           "--dataset", dataset, "--dataset_root", root, "--task", task, "--no_amp", "--num_workers", "0",
           "--batch_size", "50", "--recall_k", "1", "5", "10", "--output", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["metrics"]


def _tulip_eval(checkpoint: str, task: str, fmt: str, data: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "tulip_mega.cli", "eval", checkpoint, "--task", task, "--format", fmt,
           "--data", data, "--out", str(out), "eval.batch_size=500"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["metrics"]


@pytest.fixture(scope="module")
def exported(shapes_data, tmp_path_factory) -> dict:
    from tulip_mega.convert.openclip import export_open_clip

    root = tmp_path_factory.mktemp("clip_benchmark")
    checkpoint = run_distributed(checkpoint_worker, 1, str(root / "run"), shapes_data["tokenizer"])[0]
    export_open_clip(checkpoint, root / "export", tokenizer=shapes_data["tokenizer"], log=lambda s: None)
    write_sets(root / "data")
    return {"root": root, "checkpoint": checkpoint, "export": root / "export", "data": root / "data"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_clip_benchmark_and_tulip_mega_eval_agree_on_webdataset_sets(exported, tmp_path):
    data = exported["data"]
    theirs = _clip_benchmark(exported["export"], "wds/cls", str(data / "{dataset}"), "zeroshot_classification",
                             tmp_path / "cb_cls.json")
    ours = _tulip_eval(exported["checkpoint"], "zeroshot", "clip_benchmark", str(data / "cls"), tmp_path / "zs.json")
    print(f"zero-shot top-1: clip_benchmark {theirs['acc1']:.4f}, tulip-mega {ours['eval/zeroshot/top1']:.4f}")
    assert ours["eval/zeroshot/samples"] == 150
    assert ours["eval/zeroshot/top1"] == pytest.approx(theirs["acc1"], abs=0.01)
    assert ours["eval/zeroshot/top5"] == pytest.approx(theirs["acc5"], abs=0.01)

    theirs = _clip_benchmark(exported["export"], "wds/ret", str(data / "{dataset}"), "zeroshot_retrieval",
                             tmp_path / "cb_ret.json")
    ours = _tulip_eval(exported["checkpoint"], "retrieval", "clip_benchmark", str(data / "ret"), tmp_path / "rt.json")
    assert ours["eval/retrieval/samples"] == 60 and ours["eval/retrieval/captions"] == 150
    for k in (1, 5, 10):  # clip_benchmark: "image retrieval" = text -> image, "text retrieval" = image -> text
        print(f"R@{k}: t2i {theirs[f'image_retrieval_recall@{k}']:.4f} / {ours[f'eval/retrieval/text_to_image_r{k}']:.4f}"
              f", i2t {theirs[f'text_retrieval_recall@{k}']:.4f} / {ours[f'eval/retrieval/image_to_text_r{k}']:.4f}")
        assert ours[f"eval/retrieval/text_to_image_r{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"],
                                                                           abs=0.01)
        assert ours[f"eval/retrieval/image_to_text_r{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"],
                                                                           abs=0.01)
    assert 0 < ours["eval/retrieval/image_to_text_r1"] < 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_clip_benchmark_and_tulip_mega_eval_agree_on_an_imagenet_folder(exported, tmp_path):
    data = exported["data"]
    theirs = _clip_benchmark(exported["export"], "imagenet1k-unverified", str(data / "{dataset}"),
                             "zeroshot_classification", tmp_path / "cb_in.json")
    ours = _tulip_eval(exported["checkpoint"], "zeroshot", "imagenet", str(data / "imagenet1k-unverified" / "val"),
                       tmp_path / "in.json")
    print(f"ImageNet folder top-1: clip_benchmark {theirs['acc1']:.4f}, tulip-mega {ours['eval/zeroshot/top1']:.4f}")
    assert ours["eval/zeroshot/samples"] == 200
    assert ours["eval/zeroshot/top1"] == pytest.approx(theirs["acc1"], abs=0.01)
    assert ours["eval/zeroshot/top5"] == pytest.approx(theirs["acc5"], abs=0.01)


def test_shipped_openai_imagenet_lists_equal_clip_benchmarks_defaults():
    from clip_benchmark.datasets import builder

    from tulip_mega.eval.formats import shipped

    folder = Path(builder.__file__).parent
    assert json.loads((folder / "en_classnames.json").read_text())["imagenet1k"] == shipped("imagenet_classnames.txt")
    assert (json.loads((folder / "en_zeroshot_classification_templates.json").read_text())["imagenet1k"]
            == shipped("openai_imagenet_templates.txt"))
