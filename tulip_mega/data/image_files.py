"""Which file of a sample is its image: one extension priority for every reader.

Why: shards written by img2dataset (LAION, DataComp, users' crawls) hold the image as
``key.jpg``, ``key.jpeg``, ``key.webp`` or ``key.png`` (its ``--output_format`` /
``encode_format``), one per sample, beside ``key.txt`` and ``key.json``. The PIL loader, the
DALI loader (and its reader workers, which send offsets instead of bytes), the host checks and
``tulip-mega data stats`` must all pick the same file, so the choice is written once here.
PIL and DALI's decoder (``fn.decoders.image``, CPU and GPU) read all four formats. The GeCo
image edits are ``key.pos.<ext>`` / ``key.neg.<ext>`` with the same extensions (our own writers
use ``.jpg``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

__all__ = ["EDIT_NAMES", "IMAGE_EXTS", "MISSING_IMAGE", "all_image_files", "edit_file", "image_file"]

# Highest priority first: a sample holding several images uses the first one present.
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "webp", "png")
EDIT_NAMES: tuple[str, ...] = ("pos", "neg")  # GeCo edits: same meaning, changed meaning
# The skip reason of a sample without an image, naming what was looked for.
MISSING_IMAGE = "missing image (" + ", ".join(f".{e}" for e in IMAGE_EXTS[:-1]) + f" or .{IMAGE_EXTS[-1]})"


def _first(item: Mapping[str, Any], names: tuple[str, ...]) -> Optional[str]:
    """The first of ``names`` the sample has, as bytes or (read by a reader worker, which drops
    the bytes and keeps where they are) as an entry of ``__offsets__``."""
    where = item.get("__offsets__") or {}
    for name in names:
        if name in item or name in where:
            return name
    return None


def image_file(item: Mapping[str, Any]) -> Optional[str]:
    """The sample's image file extension (``"jpg"``, ``"webp"``, ...), or None when it has none."""
    return _first(item, IMAGE_EXTS)


def edit_file(item: Mapping[str, Any], edit: str) -> Optional[str]:
    """The file of GeCo edit ``edit`` ("pos" or "neg"), e.g. ``"pos.jpg"``, or None."""
    return _first(item, tuple(f"{edit}.{e}" for e in IMAGE_EXTS))


def all_image_files() -> frozenset[str]:
    """Every file name a decoder may read: the image and edit extensions."""
    return frozenset(IMAGE_EXTS) | {f"{edit}.{e}" for edit in EDIT_NAMES for e in IMAGE_EXTS}
