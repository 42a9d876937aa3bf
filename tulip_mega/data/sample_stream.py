"""The sample stream both loaders read: shard order, DP split, shuffle, damage, position.

Why one object: the per-rank sample order is a pure function of (shards, seed, epoch, dp_rank,
dp_size, shuffle_buffer), so a loader's exact position is a few integers (``Position``) and
resuming replays the epoch's stream up to it WITHOUT decoding (only tar reads and the shuffle
buffer). The PIL and the DALI loader compose this stream, so they read the same samples in the
same order, count bad data the same way and share one state format.

- Data parallelism (``tulip_mega.data.dp_split``): the ranks split the samples, not the
  shards. Each round (an epoch, shifted by fewer than dp_size samples when dp_size does not
  divide the sample count) is cut into dp_size contiguous ranges of equal length; each rank
  reads its range as slices of shards in the epoch's seeded shard order. ``epoch`` in the
  position is the round.
- Bad data never crashes a run: a truncated or corrupt shard flows through the stream as a
  ``Damaged`` record after its good samples (counted once, by one rank, at a deterministic
  position); bad samples are skipped, logged with shard and key and counted (``Cursor.skip``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

from tulip_mega.data.dp_split import SPLIT_NAME, ShardSlice, rank_slices, read_slice, shard_order, shard_sizes
from tulip_mega.data.image_files import MISSING_IMAGE, image_file
from tulip_mega.data.shards import ShardReadError, expand_shards

__all__ = ["Cursor", "Damaged", "Entry", "Item", "Position", "Reader", "SampleStream", "read_caption",
           "read_slices", "shuffle"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Damaged:
    """A truncated/corrupt shard in the stream, right after its good samples."""

    shard: str
    message: str  # ShardReadError's message: the shard, where the damage is, how many samples were read
    mix: Optional[tuple[int, int, int]] = None  # in a mixture: (dataset, its epoch, its position after this)


# A sample dict (``shards.iter_samples``) or a damaged shard's record.
Item = Union[dict[str, Any], Damaged]
# (epoch, index in epoch, item); an epoch's end is (epoch, -1, None).
Entry = tuple[int, int, Optional[Item]]
# Reads shard slices in order: in this process (``read_slices``) or in reader workers.
Reader = Callable[[list[ShardSlice]], Iterator[Item]]


def read_slices(slices: list[ShardSlice]) -> Iterator[Item]:
    """The samples of ``slices`` in order, a ``Damaged`` after a damaged shard's good samples
    (raised only by the slice that ends that shard)."""
    for piece in slices:
        try:
            yield from read_slice(piece)
        except ShardReadError as e:
            yield Damaged(piece.shard, str(e))


def read_caption(item: Item) -> tuple[str] | str | None:
    """(caption,) of a sample with an image and a usable caption; else a reason string (a
    counted skip) or None (an uncounted drop: the incomplete last sample of a damaged shard,
    which that shard's ``Damaged`` already counts). Shared by the PIL and the DALI loader.

    The image is any of ``image_files.IMAGE_EXTS``; ``key.json`` is not needed (img2dataset
    writes no ``.txt`` when a caption is empty: "missing caption (.txt)")."""
    if isinstance(item, Damaged):
        return item.message
    has_image = image_file(item) is not None
    if not has_image or "txt" not in item:
        if item.get("__partial__", False):
            return None
        return MISSING_IMAGE if not has_image else "missing caption (.txt)"
    try:
        caption = item["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return f"caption is not valid UTF-8 ({e})"
    if not caption.strip():
        return "empty caption"
    return (caption,)


def shuffle(items: Iterator[Item], rng: random.Random, size: int) -> Iterator[Item]:
    """Seeded reservoir-style shuffle buffer; ``Damaged`` records pass straight through."""
    if size <= 1:
        yield from items
        return
    buf: list[Item] = []
    for item in items:
        if isinstance(item, Damaged):
            yield item
        elif len(buf) < size:
            buf.append(item)
        else:
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = item
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class Position:
    """Where a loader stands after its last yielded batch: enough to continue exactly."""

    epoch: int = 0  # the round (see dp_split) the last batch ended in
    consumed: int = 0  # items of that round's stream consumed (kept, skipped or dropped)
    samples: int = 0  # samples yielded in batches, cumulative over resumes
    skipped: int = 0  # bad samples and damaged shards, cumulative over resumes


class SampleStream:
    """One DP rank's endless (or ``num_epochs``-long) stream of samples, and its position."""

    def __init__(self, shards: list[str] | str, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 256, num_epochs: Optional[int] = None) -> None:
        self.shards = expand_shards(shards) if isinstance(shards, str) else [os.fspath(s) for s in shards]
        if not self.shards:
            raise ValueError("a loader needs at least one shard")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (infinite) or >= 1, got {num_epochs}")
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle_buffer, self.num_epochs = shuffle_buffer, num_epochs
        # Samples per shard: needed to split samples over ranks (dp_size 1 reads whole shards).
        self.sizes = None if dp_size == 1 else shard_sizes(self.shards)
        if self.sizes is not None:
            self._check_split(sum(self.sizes))
        names = "\n".join(os.path.basename(s) for s in self.shards)
        self.digest = hashlib.sha1(names.encode()).hexdigest()[:16]
        self.position = Position()  # after the last yielded batch (committed only at yields)

    def _check_split(self, total: int) -> None:
        if total < self.dp_size:
            raise ValueError(f"the {len(self.shards)} shards hold {total} readable samples, fewer than "
                             f"dp_size={self.dp_size}: every data-parallel rank needs at least one sample per epoch")
        if self.dp_rank == 0:
            logger.info("data-parallel split: %d samples per epoch over %d ranks, %d or %d per rank and round "
                        "(%d of each epoch carried into the next round)", total, self.dp_size,
                        total // self.dp_size, -(-total // self.dp_size), total % self.dp_size)

    # ------------------------------------------------------------------ order

    def epoch_slices(self, epoch: int) -> list[ShardSlice]:
        """This rank's samples in round ``epoch`` as shard slices, in read order."""
        if self.sizes is None:
            return [ShardSlice(self.shards[k]) for k in shard_order(self.shards, self.seed, epoch)]
        return rank_slices(self.shards, self.sizes, self.seed, epoch, self.dp_rank, self.dp_size, self.num_epochs)

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this rank reads (some only in part) in round ``epoch``, in read order."""
        return [piece.shard for piece in self.epoch_slices(epoch)]

    def items(self, epoch: int, read: Reader = read_slices) -> Iterator[Item]:
        """Round ``epoch``'s items, through the seeded shuffle buffer."""
        rng = random.Random(f"buffer/{self.seed}/{epoch}/{self.dp_rank}")
        return shuffle(read(self.epoch_slices(epoch)), rng, self.shuffle_buffer)

    def entries(self, epoch: int, consumed: int, read: Reader = read_slices) -> Iterator[Entry]:
        """(epoch, index, item) from a position on; the first ``consumed`` items of ``epoch``
        are replayed unseen (read, not decoded). Each epoch ends with (epoch, -1, None)."""
        while self.num_epochs is None or epoch < self.num_epochs:
            stream = self.items(epoch, read)
            for _ in range(consumed):
                if next(stream, None) is None:
                    break
            for item in stream:
                yield epoch, consumed, item
                consumed += 1
            yield epoch, -1, None
            epoch, consumed = epoch + 1, 0

    def cursor(self) -> Cursor:
        """A running position for one iteration, starting at the committed one."""
        return Cursor(self, self.position)

    # ------------------------------------------------------------------ state

    def identity(self) -> dict[str, Any]:
        """What an exact resume needs to be the same (besides dp_size and the split)."""
        return {
            "dp_rank": self.dp_rank,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "num_shards": len(self.shards),
            "shards_digest": self.digest,
            "epoch_samples": None if self.sizes is None else sum(self.sizes),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last yielded batch, plus the stream's identity."""
        p, ident = self.position, self.identity()
        return {
            "epoch": p.epoch, "consumed_in_epoch": p.consumed, "seed": self.seed, "dp_rank": self.dp_rank,
            "dp_size": self.dp_size, "shuffle_buffer": self.shuffle_buffer, "num_shards": ident["num_shards"],
            "shards_digest": self.digest, "dp_split": SPLIT_NAME, "epoch_samples": ident["epoch_samples"],
            "samples": p.samples, "skipped": p.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses states from a differently configured stream.

        An exact resume needs the same per-rank sample order, which depends on dp_size, the
        rank, the seed, the shuffle buffer, the shard list and (dp_size > 1) the samples per
        epoch (batch_size may change). A dp_size > 1 state without ``dp_split`` comes from the
        whole-shard split, whose positions mean other samples: it is refused.
        """
        if "mixture" in state:
            raise ValueError(f"cannot resume the data loader: the state was saved by a mixture of datasets "
                             f"{state['mixture']} (data.mixture) but this run reads one dataset (data.train_shards); "
                             f"an exact resume needs the same data")
        required = ("epoch", "consumed_in_epoch", "seed", "dp_rank", "dp_size")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}; got keys {sorted(state)}")
        self._check_split_state(state)
        for name, mine in self.identity().items():
            if name in state and state[name] != mine:
                raise ValueError(
                    f"cannot resume the data loader: the state has {name}={state[name]!r} but this loader has "
                    f"{name}={mine!r}; an exact resume needs the same value"
                )
        self.position = Position(int(state["epoch"]), int(state["consumed_in_epoch"]),
                                 int(state.get("samples", 0)), int(state.get("skipped", 0)))

    def _check_split_state(self, state: dict[str, Any]) -> None:
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

    def stats(self) -> dict[str, int]:
        """``samples`` yielded in batches and ``skipped`` bad samples/shards, cumulative over resumes."""
        return {"samples": self.position.samples, "skipped": self.position.skipped}


class Cursor:
    """One iteration's running position: moved past every stream entry, counting skips, and
    handed to ``SampleStream.position`` only when a batch is yielded (``Cursor.emit``)."""

    def __init__(self, stream: SampleStream, start: Position) -> None:
        self.stream = stream
        self.epoch, self.consumed = start.epoch, start.consumed
        self.samples, self.skipped = start.samples, start.skipped
        self._good, self._resumed = 0, start.consumed > 0  # usable samples this epoch; started mid-epoch

    def advance(self, entry: Entry) -> Optional[Item]:
        """The entry's item, once the cursor is past it; None at an epoch's end, which raises
        when the whole epoch (read from its start) gave no usable sample."""
        epoch, index, item = entry
        if item is None:
            if self._good == 0 and not self._resumed:
                s = self.stream
                raise RuntimeError(
                    f"dp rank {s.dp_rank}/{s.dp_size}: epoch {epoch} produced no usable samples "
                    f"from shards {s.epoch_shards(epoch)[:4]}... ({self.skipped} skipped so far); "
                    f"check the data (and that there are at least dp_size samples)"
                )
            self.epoch, self.consumed, self._good, self._resumed = epoch + 1, 0, 0, False
            return None
        self.consumed = index + 1
        return item

    def keep(self) -> None:
        """A usable sample of the current epoch went into a batch."""
        self._good += 1

    def skip(self, reason: str, key: Optional[str] = None, shard: Optional[str] = None) -> None:
        """Count and log one bad sample (``key`` in ``shard``), or without a key a damaged shard's rest."""
        self.skipped += 1
        if key is None:
            logger.warning("skipping rest of shard: %s", reason)
        else:
            logger.warning("skipping sample %r in shard %s: %s", key, shard, reason)

    def skip_item(self, item: Item, reason: str) -> None:
        """``skip`` for a stream item (a sample dict or a ``Damaged`` record)."""
        if isinstance(item, Damaged):
            self.skip(reason)
        else:
            self.skip(reason, item["__key__"], item["__shard__"])

    def emit(self, batch_size: int) -> Position:
        """The position after yielding a batch of ``batch_size`` samples."""
        self.samples += batch_size
        return self.position()

    def position(self) -> Position:
        return Position(self.epoch, self.consumed, self.samples, self.skipped)


class StreamPositionMixin:
    """What a loader over a `SampleStream` says about its position: the stream answers.

    Both loaders hold their stream in `self.stream`; the position after the last yielded batch,
    its state dict and the sample counters are the stream's, so they are written once here.
    """

    stream: SampleStream

    @property
    def epoch(self) -> int:
        """Round (``dp_split``; the epoch when dp_size divides the sample count) of the current
        position: the last yielded batch ended in this round."""
        return self.stream.position.epoch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last yielded batch, plus the stream's identity."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (``SampleStream.load_state_dict``: same stream or refused)."""
        self.stream.load_state_dict(state)

    def stats(self) -> dict[str, int]:
        """``samples`` yielded in batches and ``skipped`` bad samples/shards, cumulative over resumes."""
        return self.stream.stats()
