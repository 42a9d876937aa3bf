"""A simple, single-threaded, exactly resumable batch loader (PIL decode, no DALI).

Why this design:
- The per-rank sample order is a pure function of (shards, seed, epoch, dp_rank, dp_size,
  shuffle_buffer), so a checkpoint only stores (epoch, samples consumed in that epoch). Resuming
  replays the epoch's stream up to that point WITHOUT decoding images (only tar reads and the
  shuffle buffer), then continues with exactly the batch an uninterrupted run would have made.
- Batches are always full: the tail of one epoch is completed with the head of the next, so
  no sample is dropped and every rank yields same-sized batches (what all-gather based
  contrastive losses need). At a yield nothing is half-consumed, so the position stays a
  single (epoch, count) pair even across epoch boundaries. With ``num_epochs`` set (eval),
  iteration stops after that many epochs and the last batch may be short.
- Bad data never crashes a run: corrupt images, missing or non-UTF-8 captions and truncated
  shards are skipped, logged with shard and key, and counted in ``stats()["skipped"]``.

Data parallelism (``tulip_mega.data.dp_split``): the ranks split the samples, not the shards.
Each round (an epoch, shifted by fewer than dp_size samples when dp_size does not divide the
sample count) is cut into dp_size contiguous ranges of equal length, so ranks stepping in
lockstep read every sample exactly once per round; each rank reads its range as slices of
shards in the epoch's shard order. ``epoch`` in the state is the round.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from tulip_mega.data.base import Batch
from tulip_mega.data.dp_split import SPLIT_NAME, ShardSlice, rank_slices, read_slice, shard_order, shard_sizes
from tulip_mega.data.shards import ShardReadError, expand_shards
from tulip_mega.data.tokenizer import Tokenizer

__all__ = ["BASIC_FIELDS", "SimpleLoader", "decode_image"]

# The Batch fields this loader can fill; multi-view / GeCo / EDA fields need the DALI loader.
BASIC_FIELDS: tuple[str, ...] = ("images", "tokens", "keys")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Damage:
    """A truncated/corrupt shard, flowing through the sample stream so it is counted once,
    by one rank, at a deterministic position."""

    shard: str
    message: str


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """JPEG/PNG bytes -> read-only uint8 [image_size, image_size, 3] RGB (bicubic resize, no crop).

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


def read_caption(item: dict[str, Any] | _Damage) -> tuple[str] | str | None:
    """(caption,) of a sample with an image and a usable caption; else a reason string (a
    counted skip) or None (an uncounted drop: the incomplete last sample of a damaged shard,
    which that shard's _Damage already counts). Shared by the PIL and the DALI loader."""
    if isinstance(item, _Damage):
        return item.message
    if "jpg" not in item or "txt" not in item:
        if item.get("__partial__", False):
            return None
        return f"missing {'image (.jpg)' if 'jpg' not in item else 'caption (.txt)'}"
    try:
        caption = item["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return f"caption is not valid UTF-8 ({e})"
    if not caption.strip():
        return "empty caption"
    return (caption,)


def _shuffle(items: Iterator[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """Seeded reservoir-style shuffle buffer; damage markers pass straight through."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if isinstance(item, _Damage):
            yield item
        elif len(buf) < size:
            buf.append(item)
        else:
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = item
    rng.shuffle(buf)
    yield from buf


class SimpleLoader:
    """Infinite (or ``num_epochs``-long) iterator of ``Batch`` over WebDataset shards."""

    def __init__(
        self,
        shards: list[str] | str,
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
            from tulip_mega.config import ConfigError

            raise ConfigError(
                f"data.loader=simple (the PIL loader) only produces {list(BASIC_FIELDS)}, but the recipe's "
                f"loss terms need {unsupported}; use data.loader=dali (pip install -e .[dali]) or set those "
                f"loss.weights to 0"
            )
        self.shards = expand_shards(shards) if isinstance(shards, str) else [os.fspath(s) for s in shards]
        if not self.shards:
            raise ValueError("SimpleLoader needs at least one shard")
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (infinite) or >= 1, got {num_epochs}")
        self.batch_size = batch_size
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_epochs = num_epochs
        # Samples per shard: needed to split samples over ranks (dp_size 1 reads whole shards).
        self.sizes = None if dp_size == 1 else shard_sizes(self.shards)
        if self.sizes is not None and sum(self.sizes) < dp_size:
            raise ValueError(f"the {len(self.shards)} shards hold {sum(self.sizes)} readable samples, fewer than "
                             f"dp_size={dp_size}: every data-parallel rank needs at least one sample per epoch")
        if self.sizes is not None and dp_rank == 0:
            total = sum(self.sizes)
            logger.info("data-parallel split: %d samples per epoch over %d ranks, %d or %d per rank and round "
                        "(%d of each epoch carried into the next round)", total, dp_size, total // dp_size,
                        -(-total // dp_size), total % dp_size)
        names = "\n".join(os.path.basename(s) for s in self.shards)
        self._digest = hashlib.sha1(names.encode()).hexdigest()[:16]
        # Position after the last yielded batch (committed only at yields).
        self._epoch = 0
        self._consumed = 0
        self._samples = 0
        self._skipped = 0

    # ------------------------------------------------------------------ the sample stream

    def epoch_slices(self, epoch: int) -> list[ShardSlice]:
        """This rank's samples in round ``epoch`` as shard slices, in read order."""
        if self.sizes is None:
            return [ShardSlice(self.shards[k]) for k in shard_order(self.shards, self.seed, epoch)]
        return rank_slices(self.shards, self.sizes, self.seed, epoch, self.dp_rank, self.dp_size, self.num_epochs)

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this rank reads (some only in part) in round ``epoch``, in read order."""
        return [piece.shard for piece in self.epoch_slices(epoch)]

    def _read_slices(self, slices: list[ShardSlice]) -> Iterator[dict[str, Any] | _Damage]:
        """The samples of ``slices`` in order, a _Damage after a damaged shard's good samples
        from the slice that ends it (the DALI loader overrides this to read in worker processes)."""
        for piece in slices:
            try:
                yield from read_slice(piece)
            except ShardReadError as e:
                yield _Damage(piece.shard, str(e))

    def _raw(self, epoch: int) -> Iterator[dict[str, Any] | _Damage]:
        return self._read_slices(self.epoch_slices(epoch))

    def _stream(self, epoch: int) -> Iterator[dict[str, Any] | _Damage]:
        rng = random.Random(f"buffer/{self.seed}/{epoch}/{self.dp_rank}")
        return _shuffle(self._raw(epoch), rng, self.shuffle_buffer)

    def _decode(self, item: dict[str, Any] | _Damage) -> tuple[np.ndarray, str] | str | None:
        """(image, caption), or a reason string for a counted skip, or None for an uncounted drop."""
        caption = read_caption(item)
        if not isinstance(caption, tuple):
            return caption
        caption = caption[0]
        try:
            image = decode_image(item["jpg"], self.image_size)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            return f"undecodable image ({type(e).__name__}: {e})"
        return image, caption

    def _collate(self, images: list[np.ndarray], captions: list[str], keys: list[str]) -> Batch:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # NCHW, uint8 copy
        pixels = pixels.to(torch.float32).div_(127.5).sub_(1.0)  # SigLIP: (x/255 - 0.5) / 0.5
        return Batch(images=pixels, tokens=self.tokenizer.encode(captions), keys=keys)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches starting right after the last batch yielded (or the loaded state)."""
        epoch, consumed = self._epoch, self._consumed
        samples, skipped = self._samples, self._skipped
        images: list[np.ndarray] = []
        captions: list[str] = []
        keys: list[str] = []

        def commit() -> None:
            self._epoch, self._consumed, self._samples, self._skipped = epoch, consumed, samples, skipped

        while self.num_epochs is None or epoch < self.num_epochs:
            stream = self._stream(epoch)
            resumed = consumed > 0
            for _ in range(consumed):  # replay without decoding
                if next(stream, None) is None:
                    break
            good = 0
            for item in stream:
                consumed += 1
                result = self._decode(item)
                if result is None:
                    continue
                if isinstance(result, str):
                    skipped += 1
                    if isinstance(item, _Damage):
                        logger.warning("skipping rest of shard: %s", result)
                    else:
                        logger.warning("skipping sample %r in shard %s: %s", item["__key__"], item["__shard__"], result)
                    continue
                images.append(result[0])
                captions.append(result[1])
                keys.append(item["__key__"])
                good += 1
                if len(keys) == self.batch_size:
                    samples += len(keys)
                    batch = self._collate(images, captions, keys)
                    images, captions, keys = [], [], []
                    commit()
                    yield batch
            if good == 0 and not resumed:
                raise RuntimeError(
                    f"dp rank {self.dp_rank}/{self.dp_size}: epoch {epoch} produced no usable samples "
                    f"from shards {self.epoch_shards(epoch)[:4]}... ({skipped} skipped so far); "
                    f"check the data (and that there are at least dp_size samples)"
                )
            epoch, consumed = epoch + 1, 0
        if keys:
            samples += len(keys)
            commit()
            yield self._collate(images, captions, keys)
        commit()

    # ------------------------------------------------------------------ state

    @property
    def epoch(self) -> int:
        """Round (``dp_split``; the epoch when dp_size divides the sample count) of the current
        position: the last yielded batch ended in this round."""
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last yielded batch, plus the stream's identity."""
        return {
            "epoch": self._epoch,
            "consumed_in_epoch": self._consumed,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "shuffle_buffer": self.shuffle_buffer,
            "num_shards": len(self.shards),
            "shards_digest": self._digest,
            "dp_split": SPLIT_NAME,
            "epoch_samples": None if self.sizes is None else sum(self.sizes),
            "samples": self._samples,
            "skipped": self._skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses states from a differently configured stream.

        An exact resume needs the same per-rank sample order, which depends on dp_size, the
        rank, the seed, the shuffle buffer, the shard list and (dp_size > 1) the samples per
        epoch (batch_size may change). A dp_size > 1 state without ``dp_split`` comes from the
        older whole-shard split, whose positions mean other samples: it is refused.
        """
        required = ("epoch", "consumed_in_epoch", "seed", "dp_rank", "dp_size")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}; got keys {sorted(state)}")
        if state["dp_size"] != self.dp_size:
            raise ValueError(
                f"cannot resume the data loader: the state was saved with dp_size={state['dp_size']} but this "
                f"run has dp_size={self.dp_size}. The per-rank sample order depends on dp_size, so an exact "
                f"resume needs the same data-parallel size (or start a fresh data epoch)."
            )
        if self.dp_size > 1 and state.get("dp_split") != SPLIT_NAME:
            raise ValueError(
                f"cannot resume the data loader: the state (dp_split={state.get('dp_split')!r}) was saved by the "
                f"whole-shard data-parallel split, where rank r read every dp_size-th shard; this loader splits "
                f"samples ({SPLIT_NAME!r}), so that position names other samples; resume with the version that "
                f"wrote the checkpoint"
            )
        expected = {
            "dp_rank": self.dp_rank,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "num_shards": len(self.shards),
            "shards_digest": self._digest,
            "epoch_samples": None if self.sizes is None else sum(self.sizes),
        }
        for name, mine in expected.items():
            if name in state and state[name] != mine:
                raise ValueError(
                    f"cannot resume the data loader: the state has {name}={state[name]!r} but this loader has "
                    f"{name}={mine!r}; an exact resume needs the same value"
                )
        self._epoch = int(state["epoch"])
        self._consumed = int(state["consumed_in_epoch"])
        self._samples = int(state.get("samples", 0))
        self._skipped = int(state.get("skipped", 0))

    def stats(self) -> dict[str, int]:
        """``samples`` yielded in batches and ``skipped`` bad samples/shards, cumulative over resumes."""
        return {"samples": self._samples, "skipped": self._skipped}
