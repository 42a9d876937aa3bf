"""The synthetic "shapes" dataset: a coloured shape on a plain background, with a caption.

Why: an end-to-end smoke test of contrastive pretraining needs image/text pairs whose
alignment is learnable in minutes on a CPU and checkable afterwards. Here the caption names
exactly what is drawn ("a red circle on a gray background", or just "a photo of a red
circle"), and zero-shot accuracy on the (shape, colour) classes listed in ``classes.json``
measures whether the model learned colour *and* shape.

What makes it learnable in the quickstart's budget (recipes/tiny_cpu.yaml has the numbers;
the versions that were not are in benchmarks/RESULTS.md): backgrounds are neutral (white /
black / gray, never a shape colour), so a contrastive batch holds many pairs that differ only
in shape; half the caption templates leave the background out, as the zero-shot prompts do;
shapes are large (circumradius 0.3-0.45 of the image), upright and centred, so at 32 px the
five shapes stay distinct and a 16-patch ViT need not learn translation invariance.
Compositional hard negatives (colour/shape/background swapped) and paraphrases (the other
caption templates) go into each sample's json, and GeCo-style image edits into ``key.pos.jpg``
(same shape and colour, new size) and ``key.neg.jpg`` (another shape or colour), so
the full TULIP stack (GeCo text and image terms) trains on this set.

Every sample is drawn from its own RNG seeded by (seed, split, index), and the shard writer
fixes all tar metadata, so the same seed gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from typing import Any

from PIL import Image, ImageDraw

from tulip_mega.data.shards import ShardWriter

__all__ = [
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "COLOURS",
    "DATASET_VERSION",
    "FOREGROUNDS",
    "NEGATIVE_TEMPLATE",
    "SHAPES",
    "ZERO_SHOT_TEMPLATES",
    "draw_shape",
    "fill_template",
    "jitter",
    "brace_spec",
    "make_sample",
    "to_jpeg",
    "write_json_atomically",
    "written_splits",
    "write_shapes_dataset",
]

# Well separated RGB values so the colour of a region survives JPEG and a small jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
FOREGROUNDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray")  # neutral: never a shape's colour
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a picture of a {colour} {shape} on a plain {background} backdrop",
)
# Hard negatives name the background, so the attribute-binding swap (shape colour <-> background)
# is a different caption.
NEGATIVE_TEMPLATE = "a {colour} {shape} on a {background} background"
DATASET_VERSION = 3  # written to classes.json; scripts/quickstart.sh rewrites older datasets
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("a {}", "a photo of a {}", "a {} on a plain background")
_COLOUR_JITTER = 12
_JPEG_QUALITY = 90


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` centred on (cx, cy); all contain the centre."""

    def ring(radii: list[float], offset: float) -> list[tuple[float, float]]:
        n = len(radii)
        return [
            (cx + rad * math.cos(offset + 2 * math.pi * k / n), cy + rad * math.sin(offset + 2 * math.pi * k / n))
            for k, rad in enumerate(radii)
        ]

    if shape == "square":
        return ring([r] * 4, angle + math.pi / 4)
    if shape == "triangle":
        return ring([r] * 3, angle - math.pi / 2)
    if shape == "star":
        return ring([r, 0.45 * r] * 5, angle - math.pi / 2)
    if shape == "cross":
        w = 0.32 * r  # arm half-width
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def fill_template(template: str, *args: str, **fields: str) -> str:
    """Format a caption template with correct articles ("an orange circle")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(*args, **fields))


def jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for v in rgb)  # type: ignore[return-value]


def _render(shape: str, colour: str, background: str, rng: random.Random, s: int) -> tuple[bytes, tuple[float, float, float]]:
    """JPEG bytes of one upright shape of random size at the centre; returns (jpeg, (cx, cy, r))."""
    r = rng.uniform(0.3, 0.45) * s
    cx = cy = s / 2
    img = Image.new("RGB", (s, s), jitter(COLOURS[background], rng))
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, 0.0, jitter(COLOURS[colour], rng))
    return to_jpeg(img), (cx, cy, r)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
               fill: tuple[int, int, int]) -> None:
    """Fill one shape of circumradius ``r`` centred on (cx, cy) (circles ignore ``angle``)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def to_jpeg(img: Image.Image) -> bytes:
    """The JPEG bytes every synthetic set writes (fixed quality, no chroma subsampling)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def make_sample(key: str, rng: random.Random, image_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Draw one sample; returns (webdataset sample dict, metadata with shape/colour/background)."""
    shape = rng.choice(SHAPES)
    colour = rng.choice(FOREGROUNDS)
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    jpeg, (cx, cy, r) = _render(shape, colour, background, rng, image_size)

    fields = {"colour": colour, "shape": shape, "background": background}
    template = rng.randrange(len(CAPTION_TEMPLATES))
    caption = fill_template(CAPTION_TEMPLATES[template], **fields)
    paraphrases = [fill_template(t, **fields) for i, t in enumerate(CAPTION_TEMPLATES) if i != template]
    base = NEGATIVE_TEMPLATE
    negatives = [
        fill_template(base, colour=rng.choice([c for c in FOREGROUNDS if c != colour]), shape=shape, background=background),
        fill_template(base, colour=colour, shape=rng.choice([x for x in SHAPES if x != shape]), background=background),
        fill_template(base, colour=background, shape=shape, background=colour),  # attribute-binding swap
    ]
    meta = {**fields, "center": [round(cx, 2), round(cy, 2)], "radius": round(r, 2)}
    # GeCo image edits, drawn after everything above. pos = same meaning (shape, colour,
    # background), new size and colour jitter; neg = meaning changed: another colour or another shape.
    pos, _ = _render(shape, colour, background, rng, image_size)
    if rng.random() < 0.5:
        neg_shape, neg_colour = shape, rng.choice([c for c in FOREGROUNDS if c not in (colour, background)])
    else:
        neg_shape, neg_colour = rng.choice([x for x in SHAPES if x != shape]), colour
    neg, _ = _render(neg_shape, neg_colour, background, rng, image_size)
    sample = {
        "__key__": key,
        "jpg": jpeg,
        "txt": caption,
        "json": {"paraphrases": paraphrases, "negatives": negatives, **meta},
        "pos.jpg": pos,
        "neg.jpg": neg,
    }
    return sample, meta


def _class_list() -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "shape": shape,
            "colour": colour,
            "name": f"{colour} {shape}",
            "prompts": [fill_template(t, f"{colour} {shape}") for t in ZERO_SHOT_TEMPLATES],
        }
        for i, (shape, colour) in enumerate((sh, c) for sh in SHAPES for c in FOREGROUNDS)
    ]


def _write_split(
    out_dir: str, split: str, num: int, samples_per_shard: int, image_size: int, seed: int
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    metas: dict[str, dict[str, Any]] = {}
    with ShardWriter(os.path.join(out_dir, f"{split}-%06d.tar"), samples_per_shard) as writer:
        for i in range(num):
            key = f"{split}{i:07d}"
            sample, meta = make_sample(key, random.Random(f"shapes/{seed}/{split}/{i}"), image_size)
            writer.write(sample)
            metas[key] = meta
    return writer.shards, metas


def brace_spec(out_dir: str, split: str, shards: list[str]) -> str | None:
    if not shards:
        return None
    return os.path.join(out_dir, f"{split}-{{{0:06d}..{len(shards) - 1:06d}}}.tar")


def write_shapes_dataset(
    out_dir: str,
    num_train: int = 8192,
    num_val: int = 256,
    samples_per_shard: int = 1024,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``train-%06d.tar`` / ``val-%06d.tar`` shards and ``classes.json`` into ``out_dir``.

    The defaults (8 train shards of 1024) are what the quickstart trains on: 8192 samples, so
    its few hundred steps see each about 3 times (with 2048 a plain-PyTorch replica reached a
    lower zero-shot top-1 at 400 steps: 0.32 vs 0.38, one seed).

    ``classes.json`` lists the (shape, colour) classes with ready zero-shot prompts and the
    class index of every val key, which is what the zero-shot evaluation needs. Returns the
    shard paths, brace specs (for ``--data``), counts and the classes.json path.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for recognisable shapes, got {image_size}")
    os.makedirs(out_dir, exist_ok=True)
    train, _ = _write_split(out_dir, "train", num_train, samples_per_shard, image_size, seed)
    val, val_meta = _write_split(out_dir, "val", num_val, samples_per_shard, image_size, seed)
    classes = _class_list()
    index = {(c["shape"], c["colour"]): c["index"] for c in classes}
    info = {
        "shapes": list(SHAPES),
        "colours": list(FOREGROUNDS),
        "backgrounds": list(BACKGROUNDS),
        "classes": classes,
        "templates": list(ZERO_SHOT_TEMPLATES),
        "val_labels": {k: index[(m["shape"], m["colour"])] for k, m in val_meta.items()},
        "seed": seed,
        "image_size": image_size,
        "version": DATASET_VERSION,
    }
    classes_path = os.path.join(out_dir, "classes.json")
    write_json_atomically(classes_path, info)
    return {**written_splits(out_dir, train, val, num_train, num_val),
            "num_classes": len(classes), "classes_json": classes_path}


def write_json_atomically(path: str, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON via a temporary file, so a reader never sees half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def written_splits(out_dir: str, train: list[str], val: list[str], num_train: int, num_val: int) -> dict[str, Any]:
    """What a synthetic-dataset writer returns about its train / val shards."""
    return {
        "out_dir": out_dir,
        "train_shards": train,
        "val_shards": val,
        "train_spec": brace_spec(out_dir, "train", train),
        "val_spec": brace_spec(out_dir, "val", val),
        "num_train": num_train,
        "num_val": num_val,
    }
