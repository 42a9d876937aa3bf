"""A simple, single-threaded, exactly resumable batch loader (PIL decode, no DALI).

It reads a ``SampleStream`` (shard order, DP split, shuffle buffer, damage, position; see
``tulip_mega.data.sample_stream``), decodes view 0 and tokenises the caption:

- Batches are always full: the tail of one epoch is completed with the head of the next, so
  no sample is dropped and every rank yields same-sized batches (what all-gather based
  contrastive losses need). At a yield nothing is half-consumed, so the position stays a
  single (epoch, count) pair even across epoch boundaries. With ``num_epochs`` set (eval),
  iteration stops after that many epochs and the last batch may be short.
- Bad data never crashes a run: corrupt images, missing or non-UTF-8 captions and truncated
  shards are skipped, logged with shard and key, and counted in ``stats()["skipped"]``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from tulip_mega.data.base import Batch
from tulip_mega.data.image_files import image_file
from tulip_mega.data.mixture import MixturePart, make_stream
from tulip_mega.data.sample_stream import Item, StreamPositionMixin, read_caption
from tulip_mega.data.tokenizer import Tokenizer

__all__ = ["BASIC_FIELDS", "LoaderFieldError", "SimpleLoader", "decode_image"]

# The Batch fields this loader can fill; multi-view / GeCo / EDA fields need the DALI loader.
BASIC_FIELDS: tuple[str, ...] = ("images", "tokens", "keys")


class LoaderFieldError(ValueError):
    """The caller asked for Batch fields this loader cannot produce (the message says which)."""


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> read-only uint8 [image_size, image_size, 3] RGB (bicubic resize, no crop).

    ``draft`` lets libjpeg decode large JPEGs at a reduced scale (still >= the target size),
    which is much faster than a full decode followed by a big downscale.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (image_size, image_size))
        im.load()
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return np.asarray(rgb)  # read-only view is fine: batches are built with np.stack


class SimpleLoader(StreamPositionMixin):
    """Infinite (or ``num_epochs``-long) iterator of ``Batch`` over WebDataset shards."""

    def __init__(
        self,
        shards: list[str] | str | list[MixturePart],
        batch_size: int,
        image_size: int,
        tokenizer: Tokenizer,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        num_epochs: int | None = None,
        fields: tuple[str, ...] = BASIC_FIELDS,
    ) -> None:
        unsupported = [f for f in fields if f not in BASIC_FIELDS]
        if unsupported:
            raise LoaderFieldError(
                f"data.loader=simple (the PIL loader) only produces {list(BASIC_FIELDS)}, but the recipe's "
                f"loss terms need {unsupported}; use data.loader=dali (pip install -e .[dali]) or set those "
                f"loss.weights to 0"
            )
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
        self.stream = make_stream(shards, dp_rank, dp_size, seed, shuffle_buffer, num_epochs)
        self.batch_size = batch_size
        self.image_size = image_size
        self.tokenizer = tokenizer

    def _decode(self, item: Item) -> tuple[np.ndarray, str] | str | None:
        """(image, caption), or a reason string for a counted skip, or None for an uncounted drop."""
        caption = read_caption(item)
        if not isinstance(caption, tuple):
            return caption
        try:
            image = decode_image(item[image_file(item)], self.image_size)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            return f"undecodable image ({type(e).__name__}: {e})"
        return image, caption[0]

    def _collate(self, images: list[np.ndarray], captions: list[str], keys: list[str]) -> Batch:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # NCHW, uint8 copy
        pixels = pixels.to(torch.float32).div_(127.5).sub_(1.0)  # SigLIP: (x/255 - 0.5) / 0.5
        return Batch(images=pixels, tokens=self.tokenizer.encode(captions), keys=keys)

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches starting right after the last batch yielded (or the loaded state)."""
        stream = self.stream
        cursor = stream.cursor()
        images: list[np.ndarray] = []
        captions: list[str] = []
        keys: list[str] = []
        for entry in stream.entries(cursor.epoch, cursor.consumed):
            item = cursor.advance(entry)
            result = None if item is None else self._decode(item)
            if isinstance(result, str):
                cursor.skip_item(item, result)
            elif result is not None:
                images.append(result[0])
                captions.append(result[1])
                keys.append(item["__key__"])
                cursor.keep()
                if len(keys) == self.batch_size:
                    batch = self._collate(images, captions, keys)
                    images, captions, keys = [], [], []
                    stream.position = cursor.emit(len(batch))
                    yield batch
        if keys:  # finite runs: the short last batch
            stream.position = cursor.emit(len(keys))
            yield self._collate(images, captions, keys)
        stream.position = cursor.position()
