"""Eval sets written in the published formats (no download), for the format, CLIP_benchmark and
suite tests: CLIP_benchmark's webdataset layout (its builder.py `build_wds_dataset`), an
ImageNet-1k ImageFolder tree, MMVP-VLM as released (github.com/tsb0601/MMVP). Images are the
quickstart's shapes (tulip_mega/datagen/synthetic.py) re-encoded as .webp / .png / .jpg / .jpeg, so a
briefly trained model scores above zero on them.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from PIL import Image

from tulip_mega.datagen.synthetic import (BACKGROUNDS, CAPTION_TEMPLATES, FOREGROUNDS, SHAPES, _render, fill_template,
                                   make_sample)

FIELDS = ("webp", "png", "jpg", "jpeg")
SIZE = 32


def shape_image(n: int, fmt: str, colour: str = None) -> tuple[bytes, dict]:
    """The n-th shapes image (optionally re-drawn until its colour is `colour`), encoded as `fmt`."""
    rng = random.Random(f"eval-sets/{n}")
    while True:
        sample, meta = make_sample(f"k{n}", rng, SIZE)
        if colour is None or meta["colour"] == colour:
            break
    return _encode(sample["jpg"], fmt), meta


def _encode(jpeg: bytes, fmt: str) -> bytes:
    """JPEG bytes as they are, or re-encoded losslessly as PNG / WebP."""
    if fmt in ("jpg", "jpeg"):
        return jpeg
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").save(out, format=fmt.upper(), lossless=True)
    return out.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    """A webdataset shard: consecutive `key.ext` files per sample."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def write_wds(root: Path, samples: list[dict], per_shard: int, split: str = "test") -> None:
    (root / split).mkdir(parents=True)
    shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for i, part in enumerate(shards):
        write_tar(root / split / f"{i}.tar", part)
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")


def write_wds_classification(root: Path, count: int = 150, per_shard: int = 64) -> None:
    """6 colour classes; classnames.txt and three {c} templates at the root."""
    samples = []
    for n in range(count):
        c = n % len(FOREGROUNDS)
        image, _ = shape_image(n, FIELDS[n % 4], FOREGROUNDS[c])
        samples.append({"__key__": f"c{n:05d}", FIELDS[n % 4]: image, "cls": str(c).encode()})
    write_wds(root, samples, per_shard)
    (root / "classnames.txt").write_text("\n".join(FOREGROUNDS) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} shape\na photo of a {c} thing\n{c}\n")


RETRIEVAL_TEMPLATES = (CAPTION_TEMPLATES[2], CAPTION_TEMPLATES[3], "a photo of a {colour} {shape} on a {background} "
                       "background", "a {background} background with a {colour} {shape}")


def write_wds_retrieval(root: Path, count: int = 60, per_shard: int = 25) -> int:
    """Images with 1-4 captions each; every image a different (colour, shape, background) and every
    caption naming all three, so no caption is shared by two images (no ties: clip_benchmark's
    top-k breaks them by position, we count them against); returns the caption count."""
    triples = [(c, s, b) for c in FOREGROUNDS for s in SHAPES for b in BACKGROUNDS]
    random.Random("eval-sets/retrieval").shuffle(triples)
    samples, captions_total = [], 0
    for n, (colour, shape, background) in enumerate(triples[:count]):
        jpeg, _ = _render(shape, colour, background, random.Random(f"eval-sets/r{n}"), SIZE)
        image = _encode(jpeg, FIELDS[n % 4])
        fields = {"colour": colour, "shape": shape, "background": background}
        captions = [fill_template(t, **fields) for t in RETRIEVAL_TEMPLATES][: 1 + n % 5]
        captions_total += len(captions)
        samples.append({"__key__": f"r{n:05d}", FIELDS[n % 4]: image, "txt": "\n".join(captions).encode()})
    write_wds(root, samples, per_shard)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return captions_total


def write_imagenet(val: Path) -> None:
    """1000 WordNet-id folders (n00000000 ...: sorted = index order), one image in each (torchvision's
    ImageFolder, which clip_benchmark uses, refuses empty class folders)."""
    for c in range(1000):
        (val / f"n{c:08d}").mkdir(parents=True)
        image, _ = shape_image(2000 + c, "jpeg")
        (val / f"n{c:08d}" / f"ILSVRC2012_val_{c:08d}.JPEG").write_bytes(image)


def write_mmvp(root: Path, patterns=("Orientation", "Color and Appearance", "Quantity"), pairs: int = 3) -> None:
    """MMVP-VLM as released: Questions.csv (qid, pattern, statement; two rows = a pair) and
    MMVP_VLM_Images/<pattern>/<qid>.jpg, qids from 1."""
    rows, qid = ["Question ID,Type,Statement"], 1
    for pattern in patterns:
        (root / "MMVP_VLM_Images" / pattern).mkdir(parents=True)
        for _ in range(pairs):
            for _ in range(2):
                image, meta = shape_image(3000 + qid, "jpg")
                rows.append(f'{qid},{pattern},"the {meta["colour"]} {meta["shape"]}, on {meta["background"]}"')
                (root / "MMVP_VLM_Images" / pattern / f"{qid}.jpg").write_bytes(image)
                qid += 1
    (root / "Questions.csv").write_text("\n".join(rows) + "\n")


def train_worker(run_dir: str, train: str, tokenizer: str, steps: int) -> str:
    """recipes/tiny_cpu.yaml for `steps` steps at TP = PP = 1; returns the final checkpoint."""
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train as run_training

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml")
    overrides = [f"data.train_shards={train}", f"data.tokenizer={tokenizer}", f"run.output_dir={run_dir}",
                 "run.name=evalsets", "logging.tensorboard=false", "parallel.tensor_parallel=1",
                 "parallel.pipeline_parallel=1", f"train.steps={steps}", "checkpoint.interval=0", "eval.interval=0",
                 "eval.zeroshot_shards=null", "eval.retrieval_shards=null"]
    return str(run_training(load_config(recipe, overrides))["checkpoint"])
