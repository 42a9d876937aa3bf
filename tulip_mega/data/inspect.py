"""`tulip-mega data inspect` (an image grid of samples and their views) and `data stats`.

Why: the fastest check that a recipe's views are what one meant (crop scales, colour
augmentation strength, GeCo edits lined up with their sample) is to look at them. The grid
shows one row per sample: view 0, the global crops, the local crops (upscaled to the row
height) and the pos/neg edits, with the caption underneath. It is drawn with PIL (no
matplotlib figure machinery), straight from the DALI loader's batch, i.e. exactly what the
model receives (de-normalised back to pixels).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from tulip_mega.data.base import IMAGE_MEAN, IMAGE_STD, Batch
from tulip_mega.data.image_files import MISSING_IMAGE, image_file
from tulip_mega.data.shards import ShardReadError, expand_shards, iter_samples

__all__ = ["batch_grid", "shard_stats"]

_CAPTION_H = 14
_PAD = 2


def _to_pil(view: torch.Tensor, size: int) -> Image.Image:
    """[3, h, w] normalised -> RGB image of side ``size`` (nearest upscaling keeps pixels visible)."""
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    pixels = ((view.detach().cpu().float() * std + mean) * 255).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(pixels))
    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.NEAREST)


def batch_grid(batch: Batch, captions: list[str], out_png: str, max_rows: int = 8) -> str:
    """Write ``out_png``: one row per sample (view 0 | crops | local crops | pos, neg edits)."""
    rows = min(len(batch), max_rows)
    size = batch.images.shape[-1]
    per_row: list[list[torch.Tensor]] = []
    for i in range(rows):
        views = [batch.images[i]]
        for field in ("crops", "local_crops", "edits"):
            t = getattr(batch, field)
            if t is not None:
                views.extend(t[i].unbind(0))
        per_row.append(views)
    cols = max(len(r) for r in per_row)
    width = cols * (size + _PAD) + _PAD
    row_h = size + _CAPTION_H + _PAD
    grid = Image.new("RGB", (max(width, 200), rows * row_h + _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, views in enumerate(per_row):
        y = _PAD + r * row_h
        for c, view in enumerate(views):
            grid.paste(_to_pil(view, size), (_PAD + c * (size + _PAD), y))
        draw.text((_PAD, y + size), f"{batch.keys[r]}: {captions[r]}"[:120], fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    grid.save(out_png)
    return out_png


def shard_stats(spec: str | list[str]) -> dict[str, Any]:
    """Counts over a shard set: samples, fields present, image formats, damaged shards, caption
    lengths, and the problems that make the loaders skip a sample, named with the loaders'
    reasons (``image_files.MISSING_IMAGE``, "missing caption (.txt)", "empty caption", ...).
    img2dataset writes no ``.txt`` when a caption is empty, so that is the usual problem there."""
    shards = expand_shards(spec) if isinstance(spec, str) else list(spec)
    fields: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    damaged: list[str] = []
    words: list[int] = []
    samples = 0
    size = 0
    for shard in shards:
        size += os.path.getsize(shard)
        try:
            for s in iter_samples(shard):
                samples += 1
                fields.update(k for k in s if not k.startswith("__"))
                image = image_file(s)
                if image is None:
                    problems[MISSING_IMAGE] += 1
                else:
                    formats[image] += 1
                if "txt" not in s:
                    problems["missing caption (.txt)"] += 1
                else:
                    try:
                        caption = s["txt"].decode("utf-8")
                    except UnicodeDecodeError:
                        caption = None
                        problems["caption not UTF-8"] += 1
                    if caption is not None and not caption.strip():
                        problems["empty caption"] += 1
                    elif caption is not None:
                        words.append(len(caption.split()))
                if "json" in s:
                    try:
                        if not isinstance(json.loads(s["json"].decode("utf-8")), dict):
                            problems["json is not an object"] += 1
                    except (UnicodeDecodeError, ValueError):
                        problems["malformed json"] += 1
        except ShardReadError as e:
            damaged.append(str(e))
    return {
        "shards": len(shards),
        "bytes": size,
        "samples": samples,
        "fields": dict(sorted(fields.items())),
        "image_formats": dict(sorted(formats.items())),
        "problems": dict(sorted(problems.items())),
        "damaged_shards": damaged,
        "caption_words_mean": float(np.mean(words)) if words else 0.0,
        "caption_words_max": int(max(words)) if words else 0,
    }
