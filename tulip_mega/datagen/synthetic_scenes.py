"""The synthetic "scenes" dataset: what CLIP-style models are known to miss, named in captions.

Why: the shapes set (synthetic.py) checks that a model learns anything; it cannot tell a model
with fine-grained, vision-centric features from a bag-of-words one. Every scene here is one of:

- a **count** scene: 1-4 objects of one kind and size on a plain background,
  "three small red circles";
- a **relation** scene: two objects of different colours and shapes in a relative position,
  "a red circle left of a blue square" (left of / right of / above / below).

A scene is a flat dict of attributes (``scene["kind"]`` plus count/size/colour/shape, or
relation/colour_a/shape_a/colour_b/shape_b). Six attributes can change one at a time
(`ATTRIBUTES`): count, size, colour and shape (of either object), position (the relation) and
binding (the two colours swapped between the objects). `alternatives(scene, attribute)` lists
every valid scene that differs in exactly that attribute; `changed_attribute(a, b)` names the
one attribute two scenes differ in (None otherwise). The evaluations (tulip_mega/eval/scenes.py)
and the tests use both.

Each sample carries the GeCo fields the TULIP recipe trains on: ``paraphrases`` (the other
caption templates of the same scene), ``negatives`` (one canonical caption per applicable
attribute swap, in a per-sample random order so the first N the loader keeps cover every
attribute over the set; ``negative_attributes`` and ``negative_scenes`` say which swap each
is), ``key.pos.jpg`` (the same scene re-drawn with new positions, sizes within the size class,
angles and colour jitter) and ``key.neg.jpg`` (the scene of one random swap). ``regions`` lists
every object with its box (the circle it is drawn in, fractions of the image: x0, y0, x1, y1)
and its name ("small red circle"; "red circle" in relation scenes): SigLIP 2's LocCa targets.

The val split is written in MMVP-style pairs: sample 2i+1 is sample 2i with exactly one
attribute changed (attributes cycle so every one is represented), listed in ``scenes.json``
under ``pairs``. ``scenes.json`` also holds every sample's scene (train and val) for the zero-shot
evaluation and the linear probes.

Every sample is drawn from its own RNG seeded by ("scenes", seed, split, index); the shard
writer fixes all tar metadata, so the same seed gives byte-identical shards.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any, Optional

from PIL import Image, ImageDraw

from tulip_mega.data.shards import ShardWriter
from tulip_mega.datagen.synthetic import (COLOURS, FOREGROUNDS, SHAPES, draw_shape, fill_template, jitter, to_jpeg,
                                   write_json_atomically, written_splits)

__all__ = [
    "ATTRIBUTES",
    "COUNTS",
    "RELATIONS",
    "SIZES",
    "alternatives",
    "applicable",
    "caption",
    "changed_attribute",
    "draw_scene",
    "make_scene_sample",
    "scenes_json",
    "split_info",
    "write_scenes_dataset",
]

ATTRIBUTES: tuple[str, ...] = ("count", "size", "colour", "shape", "position", "binding")
COUNTS: tuple[str, ...] = ("one", "two", "three", "four")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray")  # never a foreground colour
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
# Template 0 is canonical: hard negatives and evaluation candidates use it.
COUNT_TEMPLATES: tuple[str, ...] = (
    "{count} {size} {colour} {shapes}",
    "a picture of {count} {size} {colour} {shapes}",
    "{count} {size} {colour} {shapes} on a plain background",
)
RELATION_TEMPLATES: tuple[str, ...] = (
    "a {colour_a} {shape_a} {relation} a {colour_b} {shape_b}",
    "a {colour_b} {shape_b} {converse} a {colour_a} {shape_a}",
    "a picture of a {colour_a} {shape_a} {relation} a {colour_b} {shape_b}",
)
_RADIUS = {"small": (0.06, 0.08), "large": (0.12, 0.15), "pair": (0.11, 0.15)}  # x image size
_GRID = 3  # count scenes place objects in distinct cells of a 3 x 3 grid
_MIN_GAP, _MAX_OFF = 0.35, 0.12  # relation scenes: along-axis gap >= 0.35 s, off-axis offset <= 0.12 s
_KIND_FIELDS = {"count": ("count", "size", "colour", "shape"),
                "relation": ("relation", "colour_a", "shape_a", "colour_b", "shape_b")}
_FIELD_ATTRIBUTE = {"count": "count", "size": "size", "colour": "colour", "shape": "shape", "relation": "position",
                    "colour_a": "colour", "colour_b": "colour", "shape_a": "shape", "shape_b": "shape"}


# --- scenes as attribute dicts ----------------------------------------------------------------
def _valid(scene: dict[str, Any]) -> bool:
    """Relation scenes need two colours and two shapes (else a binding swap equals a position swap)."""
    if scene["kind"] == "relation":
        return scene["colour_a"] != scene["colour_b"] and scene["shape_a"] != scene["shape_b"]
    return True


def random_scene(rng: random.Random) -> dict[str, Any]:
    """A uniformly drawn count or relation scene."""
    if rng.random() < 0.5:
        return {"kind": "count", "count": rng.choice(COUNTS), "size": rng.choice(SIZES),
                "colour": rng.choice(FOREGROUNDS), "shape": rng.choice(SHAPES)}
    ca, cb = rng.sample(FOREGROUNDS, 2)
    sa, sb = rng.sample(SHAPES, 2)
    return {"kind": "relation", "relation": rng.choice(RELATIONS), "colour_a": ca, "shape_a": sa,
            "colour_b": cb, "shape_b": sb}


def applicable(scene: dict[str, Any]) -> tuple[str, ...]:
    """The attributes a scene of this kind can change in."""
    if scene["kind"] == "count":
        return ("count", "size", "colour", "shape")
    return ("colour", "shape", "position", "binding")


def alternatives(scene: dict[str, Any], attribute: str) -> list[dict[str, Any]]:
    """Every valid scene that differs from `scene` in exactly `attribute` (fixed order)."""
    if attribute not in applicable(scene):
        return []
    if attribute == "binding":
        return [{**scene, "colour_a": scene["colour_b"], "colour_b": scene["colour_a"]}]
    values = {"count": COUNTS, "size": SIZES, "colour": FOREGROUNDS, "shape": SHAPES, "position": RELATIONS}[attribute]
    fields = [f for f in _KIND_FIELDS[scene["kind"]] if _FIELD_ATTRIBUTE[f] == attribute]
    out = [{**scene, f: v} for f in fields for v in values if v != scene[f]]
    return [s for s in out if _valid(s)]


def changed_attribute(a: dict[str, Any], b: dict[str, Any]) -> Optional[str]:
    """The one attribute in which scenes a and b differ, or None (same scene, several, other kind)."""
    if a["kind"] != b["kind"] or not (_valid(a) and _valid(b)):
        return None
    diff = [f for f in _KIND_FIELDS[a["kind"]] if a[f] != b[f]]
    if len(diff) == 1:
        return _FIELD_ATTRIBUTE[diff[0]]
    if sorted(diff) == ["colour_a", "colour_b"] and (a["colour_a"], a["colour_b"]) == (b["colour_b"], b["colour_a"]):
        return "binding"
    return None


def caption(scene: dict[str, Any], template: int = 0) -> str:
    """The scene's caption in one of its kind's templates (0 = canonical)."""
    if scene["kind"] == "count":
        shapes = scene["shape"] if scene["count"] == "one" else _PLURAL[scene["shape"]]
        return fill_template(COUNT_TEMPLATES[template], count=scene["count"], size=scene["size"],
                             colour=scene["colour"], shapes=shapes)
    return fill_template(RELATION_TEMPLATES[template], converse=_CONVERSE[scene["relation"]],
                         **{f: scene[f] for f in _KIND_FIELDS["relation"]})


def _templates(scene: dict[str, Any]) -> int:
    return len(COUNT_TEMPLATES if scene["kind"] == "count" else RELATION_TEMPLATES)


# --- drawing ----------------------------------------------------------------------------------
def _radius(rng: random.Random, which: str, s: int) -> float:
    lo, hi = _RADIUS[which]
    return rng.uniform(lo, hi) * s


def _relation_centres(relation: str, ra: float, rb: float, rng: random.Random, s: int) -> tuple[float, ...]:
    """Centres (ax, ay, bx, by) with a `relation` b unambiguous: along-axis gap, small off-axis offset."""
    for _ in range(1000):
        ax, ay = rng.uniform(ra + 1, s - ra - 1), rng.uniform(ra + 1, s - ra - 1)
        bx, by = rng.uniform(rb + 1, s - rb - 1), rng.uniform(rb + 1, s - rb - 1)
        along, off = {"left of": (bx - ax, by - ay), "right of": (ax - bx, by - ay),
                      "above": (by - ay, bx - ax), "below": (ay - by, bx - ax)}[relation]
        if along >= max(_MIN_GAP * s, ra + rb + 1) and abs(off) <= _MAX_OFF * s:
            return ax, ay, bx, by
    raise RuntimeError(f"could not place a {relation!r} pair in {s} px")  # never at s >= 16


def _region(caption_text: str, cx: float, cy: float, r: float, s: int) -> dict[str, Any]:
    """One object's region: the box of the circle it is drawn in (fractions of the image) and its name."""
    box = [max(0.0, (cx - r) / s), max(0.0, (cy - r) / s), min(1.0, (cx + r) / s), min(1.0, (cy + r) / s)]
    return {"box": [round(v, 4) for v in box], "caption": caption_text}


def draw_scene(scene: dict[str, Any], rng: random.Random, s: int, regions: Optional[list] = None) -> bytes:
    """JPEG bytes of one rendering of `scene` (positions, radii, angles and colour jitter from rng);
    each object's region (box + caption, for LocCa) is appended to `regions` when given."""
    img = Image.new("RGB", (s, s), jitter(COLOURS[rng.choice(BACKGROUNDS)], rng))
    draw = ImageDraw.Draw(img)
    regions = [] if regions is None else regions
    if scene["kind"] == "count":
        cell = s / _GRID
        for c in rng.sample(range(_GRID * _GRID), COUNTS.index(scene["count"]) + 1):
            r = _radius(rng, scene["size"], s)
            slack = max(0.0, cell / 2 - r - 0.5)
            cx = (c % _GRID + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (c // _GRID + 0.5) * cell + rng.uniform(-slack, slack)
            regions.append(_region(f"{scene['size']} {scene['colour']} {scene['shape']}", cx, cy, r, s))
            draw_shape(draw, scene["shape"], cx, cy, r, rng.uniform(0, 2 * math.pi), jitter(COLOURS[scene["colour"]], rng))
    else:
        ra, rb = _radius(rng, "pair", s), _radius(rng, "pair", s)
        ax, ay, bx, by = _relation_centres(scene["relation"], ra, rb, rng, s)
        for shape, colour, cx, cy, r in ((scene["shape_a"], scene["colour_a"], ax, ay, ra),
                                         (scene["shape_b"], scene["colour_b"], bx, by, rb)):
            regions.append(_region(f"{colour} {shape}", cx, cy, r, s))
            draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), jitter(COLOURS[colour], rng))
    return to_jpeg(img)


# --- samples and splits -----------------------------------------------------------------------
def make_scene_sample(key: str, scene: dict[str, Any], rng: random.Random, image_size: int) -> dict[str, Any]:
    """One webdataset sample of `scene`: image, caption, GeCo paraphrases / negatives / edits."""
    template = rng.randrange(_templates(scene))
    swaps = [(attr, rng.choice(alternatives(scene, attr))) for attr in applicable(scene)]
    rng.shuffle(swaps)
    regions: list[dict[str, Any]] = []
    jpeg = draw_scene(scene, rng, image_size, regions)
    pos = draw_scene(scene, rng, image_size)
    neg = draw_scene(rng.choice(swaps)[1], rng, image_size)
    return {
        "__key__": key,
        "jpg": jpeg,
        "txt": caption(scene, template),
        "json": {
            "scene": scene,
            "paraphrases": [caption(scene, t) for t in range(_templates(scene)) if t != template],
            "negatives": [caption(s) for _, s in swaps],
            "negative_attributes": [a for a, _ in swaps],
            "negative_scenes": [s for _, s in swaps],
            "regions": regions,  # every object: its box and name (LocCa's region captions)
        },
        "pos.jpg": pos,
        "neg.jpg": neg,
    }


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"scenes/{seed}/{split}/{index}")


def _split_scenes(split: str, num: int, seed: int) -> list[tuple[dict[str, Any], Optional[str]]]:
    """(scene, attribute changed from the previous sample or None); val comes in one-swap pairs."""
    out: list[tuple[dict[str, Any], Optional[str]]] = []
    for i in range(num):
        if split == "val" and i % 2 == 1:
            base = out[-1][0]
            attrs = applicable(base)
            attr = attrs[(i // 2) % len(attrs)]  # cycle: every attribute gets pairs
            out.append((_rng(seed, "val-pair", i).choice(alternatives(base, attr)), attr))
        else:
            out.append((random_scene(_rng(seed, f"{split}-scene", i)), None))
    return out


def split_info(split: str, num: int, seed: int) -> tuple[dict[str, dict[str, Any]], list[list[str]]]:
    """The scenes of a split (key -> scene) and its one-swap pairs ([key, key, attribute]),
    without drawing images: what scenes.json records and the evaluations read."""
    scenes: dict[str, dict[str, Any]] = {}
    pairs: list[list[str]] = []
    for i, (scene, changed) in enumerate(_split_scenes(split, num, seed)):
        key = f"{split}{i:07d}"
        scenes[key] = scene
        if changed is not None:
            pairs.append([f"{split}{i - 1:07d}", key, changed])
    return scenes, pairs


def scenes_json(num_train: int, num_val: int, seed: int, image_size: int) -> dict[str, Any]:
    """The contents of scenes.json: vocabularies, every sample's scene, the val pairs."""
    train, _ = split_info("train", num_train, seed)
    val, pairs = split_info("val", num_val, seed)
    return {"attributes": list(ATTRIBUTES), "counts": list(COUNTS), "sizes": list(SIZES),
            "colours": list(FOREGROUNDS), "shapes": list(SHAPES), "relations": list(RELATIONS),
            "train": train, "val": val, "pairs": pairs, "seed": seed, "image_size": image_size}


def _write_split(out_dir: str, split: str, scenes: dict[str, dict[str, Any]], samples_per_shard: int,
                 image_size: int, seed: int) -> list[str]:
    with ShardWriter(os.path.join(out_dir, f"{split}-%06d.tar"), samples_per_shard) as writer:
        for i, (key, scene) in enumerate(scenes.items()):
            writer.write(make_scene_sample(key, scene, _rng(seed, split, i), image_size))
    return writer.shards


def write_scenes_dataset(
    out_dir: str,
    num_train: int = 4096,
    num_val: int = 512,
    samples_per_shard: int = 256,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``train-%06d.tar`` / ``val-%06d.tar`` shards and ``scenes.json`` into ``out_dir``.

    ``scenes.json`` holds the attribute vocabularies, every sample's scene (``train`` and
    ``val``: key -> scene) and the val ``pairs`` ([key, key, attribute]): what
    tulip_mega/eval/scenes.py needs. Returns shard paths, brace specs, counts and its path.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for recognisable shapes, got {image_size}")
    os.makedirs(out_dir, exist_ok=True)
    info = scenes_json(num_train, num_val, seed, image_size)
    train = _write_split(out_dir, "train", info["train"], samples_per_shard, image_size, seed)
    val = _write_split(out_dir, "val", info["val"], samples_per_shard, image_size, seed)
    path = os.path.join(out_dir, "scenes.json")
    write_json_atomically(path, info)
    return {**written_splits(out_dir, train, val, num_train, num_val), "scenes_json": path}
