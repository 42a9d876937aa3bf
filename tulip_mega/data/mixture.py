"""A weighted mixture of datasets as one sample stream, with an exact, per-dataset position.

Why our own and not energon's blending: the loaders' host path stays ours (benchmarks/RESULTS.md,
"energon's read path vs ours"), and a mixture has to keep what a single dataset has: exact
resume (kill -9 included), every bad sample skipped and counted, the data-parallel split by
samples, position-seeded views. So a mixture is built from one ``SampleStream`` per dataset:

- Each dataset keeps its own shard order, DP split, shuffle buffer and epochs (its epochs run
  independently: a small curated set cycles many times while a web set is read once).
- Mixture position m draws its dataset with probability weight / sum(weights) from a generator
  seeded by (seed, DP rank, m // BLOCK), so the draw at m is a pure function of m; the rank's
  stream is the datasets' own streams interleaved by those draws.
- The position is m plus each dataset's (epoch, items consumed in it): every item the mixture
  hands out carries its dataset and that dataset's position after it (``MIX_KEY`` on a sample,
  ``Damaged.mix`` on a damaged shard), which the cursor commits at batch boundaries. Resuming
  replays each dataset's epoch up to its position without decoding, as a single stream does.
- Counters per dataset: samples that went into yielded batches and bad data skipped, so the
  log can show the realised mixture next to the weights (``stats``).

The mixture never ends (training only; evaluation reads single datasets).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from tulip_mega.data.sample_stream import (Cursor, Damaged, Entry, Item, Position, Reader, SampleStream,
                                           read_slices)

__all__ = ["MIX_KEY", "MixtureCursor", "MixturePart", "MixturePosition", "MixtureStream", "make_stream"]

logger = logging.getLogger(__name__)

MIX_KEY = "__mix__"  # on a sample dict: (dataset index, its epoch, items of that epoch consumed after it)
BLOCK = 4096  # mixture positions drawn per seeded generator
_SEED_STRIDE = 7919  # dataset i's stream seed is seed + _SEED_STRIDE * (i + 1): unrelated shuffles


@dataclass(frozen=True)
class MixturePart:
    """One dataset of a mixture: its name, shards (expanded paths or URLs) and relative weight."""

    name: str
    shards: list[str]
    weight: float


@dataclass(frozen=True)
class MixturePosition(Position):
    """``Position`` (epoch is always 0, consumed = mixture positions handed out) plus, per
    dataset, its own (epoch, consumed), samples in yielded batches and skipped bad data."""

    parts: tuple[tuple[int, int], ...] = ()
    drawn: tuple[int, ...] = ()
    part_skipped: tuple[int, ...] = ()


def _mix_of(item: Item) -> tuple[int, int, int]:
    return item.mix if isinstance(item, Damaged) else item[MIX_KEY]  # type: ignore[return-value]


class MixtureStream:
    """One DP rank's endless stream drawn from several ``SampleStream``s by weight."""

    def __init__(self, parts: Sequence[MixturePart], dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 256) -> None:
        if len(parts) < 1:
            raise ValueError("a mixture needs at least one dataset")
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture dataset names must be unique, got {names}")
        bad = [p.name for p in parts if not p.weight > 0]
        if bad:
            raise ValueError(f"mixture datasets {bad} have a weight <= 0; every weight must be > 0")
        self.names = names
        self.weights = [float(p.weight) for p in parts]
        self.dp_rank, self.dp_size, self.seed, self.shuffle_buffer = dp_rank, dp_size, seed, shuffle_buffer
        self.parts = [SampleStream(p.shards, dp_rank, dp_size, seed + _SEED_STRIDE * (i + 1), shuffle_buffer)
                      for i, p in enumerate(parts)]
        owner: dict[str, str] = {}
        for name, stream in zip(names, self.parts):
            for shard in stream.shards:
                if owner.setdefault(shard, name) != name:
                    raise ValueError(f"shard {shard} is in mixture datasets {owner[shard]!r} and {name!r}; "
                                     f"a shard may belong to one dataset only (its samples are counted per dataset)")
        n = len(parts)
        self.position = MixturePosition(parts=((0, 0),) * n, drawn=(0,) * n, part_skipped=(0,) * n)
        if dp_rank == 0:
            total = sum(self.weights)
            logger.info("data mixture: %s", ", ".join(
                f"{name} {w / total:.3f} ({len(s.shards)} shards)" for name, w, s in zip(names, self.weights, self.parts)))

    # ------------------------------------------------------------------ order

    def choices(self, start: int) -> Iterator[int]:
        """Dataset index of every mixture position from ``start`` on (a pure function of it)."""
        block, offset = divmod(start, BLOCK)
        indices = range(len(self.parts))
        while True:
            rng = random.Random(f"mixture/{self.seed}/{self.dp_rank}/{block}")
            yield from rng.choices(indices, weights=self.weights, k=BLOCK)[offset:]
            block, offset = block + 1, 0

    def _part_items(self, i: int, epoch: int, consumed: int, read: Reader) -> Iterator[Item]:
        """Dataset i's items from its position on, each tagged with i and its position after it."""
        part = self.parts[i]
        fresh = consumed == 0
        got = 0
        for e, index, item in part.entries(epoch, consumed, read):
            if item is None:
                if fresh and got == 0:
                    raise RuntimeError(f"mixture dataset {self.names[i]!r}: epoch {e} holds no samples for dp rank "
                                       f"{self.dp_rank}/{self.dp_size} (shards {part.epoch_shards(e)[:4]}...)")
                fresh, got = True, 0
                continue
            got += 1
            mix = (i, e, index + 1)
            if isinstance(item, Damaged):
                yield replace(item, mix=mix)
            else:
                item[MIX_KEY] = mix
                yield item

    def entries(self, epoch: int, consumed: int, read: Union[Reader, Sequence[Reader]] = read_slices) -> Iterator[Entry]:
        """(0, m, item) from mixture position ``consumed`` on. Resuming needs the datasets'
        positions there, so it starts at 0 or at the committed position (``self.position``).
        ``read``: one reader for every dataset, or one per dataset (reader worker pools)."""
        if epoch != 0:
            raise ValueError(f"a mixture has no epochs of its own (epoch 0), got epoch {epoch}")
        if consumed == 0:
            starts: Sequence[tuple[int, int]] = [(0, 0)] * len(self.parts)
        elif consumed == self.position.consumed:
            starts = self.position.parts  # type: ignore[attr-defined]
        else:
            raise ValueError(f"a mixture resumes only from its committed position {self.position.consumed}, "
                             f"not {consumed}")
        reads = list(read) if isinstance(read, (list, tuple)) else [read] * len(self.parts)
        if len(reads) != len(self.parts):
            raise ValueError(f"{len(reads)} readers for {len(self.parts)} mixture datasets")
        streams = [self._part_items(i, e, c, reads[i]) for i, (e, c) in enumerate(starts)]
        for m, i in enumerate(self.choices(consumed), start=consumed):
            yield 0, m, next(streams[i])

    def epoch_shards(self, epoch: int) -> list[str]:
        """Every dataset's shards in its round ``epoch`` (error messages)."""
        return [s for part in self.parts for s in part.epoch_shards(epoch)]

    def cursor(self) -> MixtureCursor:
        return MixtureCursor(self, self.position)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The mixture position and each dataset's ``SampleStream`` state (JSON-serialisable)."""
        p = self.position
        parts = []
        for name, part, (e, c), drawn, skipped in zip(self.names, self.parts, p.parts, p.drawn, p.part_skipped):
            part.position = Position(e, c, drawn, skipped)
            parts.append({"name": name, **part.state_dict()})
        return {"mixture": list(self.names), "weights": list(self.weights), "epoch": 0, "consumed_in_epoch": p.consumed,
                "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "shuffle_buffer": self.shuffle_buffer, "samples": p.samples, "skipped": p.skipped, "parts": parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a single-dataset state and any other mixture (names,
        weights, DP size or a dataset's shards, seed or split), since positions would name other samples."""
        if "mixture" not in state:
            raise ValueError("cannot resume the data loader: the state was saved by a single-dataset run "
                             "(data.train_shards) but this run reads a mixture (data.mixture); an exact resume "
                             "needs the same data")
        for key, mine in (("mixture", self.names), ("weights", self.weights), ("dp_size", self.dp_size),
                          ("dp_rank", self.dp_rank), ("seed", self.seed)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume the data loader: the state has {key}={state.get(key)!r} but this "
                                 f"mixture has {key}={mine!r}; an exact resume needs the same value")
        positions, drawn, skipped = [], [], []
        for name, part, sub in zip(self.names, self.parts, state["parts"]):
            try:
                part.load_state_dict(sub)
            except ValueError as e:
                raise ValueError(f"mixture dataset {name!r}: {e}") from None
            positions.append((part.position.epoch, part.position.consumed))
            drawn.append(part.position.samples)
            skipped.append(part.position.skipped)
        self.position = MixturePosition(0, int(state["consumed_in_epoch"]), int(state["samples"]),
                                        int(state["skipped"]), tuple(positions), tuple(drawn), tuple(skipped))

    def stats(self) -> dict[str, int]:
        """``samples`` and ``skipped`` over the mixture, and ``samples/<name>`` / ``skipped/<name>``
        per dataset (cumulative over resumes)."""
        p = self.position
        out = {"samples": p.samples, "skipped": p.skipped}
        out.update({f"samples/{name}": n for name, n in zip(self.names, p.drawn)})
        out.update({f"skipped/{name}": n for name, n in zip(self.names, p.part_skipped)})
        return out


class MixtureCursor(Cursor):
    """``Cursor`` over a mixture: also moves each dataset's position and counters.

    A sample counts for its dataset when a batch holding it is yielded: the DALI loader drops a
    sample it cannot decode after ``keep`` (``skip`` with that sample's key then moves it from
    kept to skipped)."""

    def __init__(self, stream: MixtureStream, start: MixturePosition) -> None:
        super().__init__(stream, start)  # type: ignore[arg-type]
        self.parts = list(start.parts)
        self.drawn = list(start.drawn)
        self.part_skipped = list(start.part_skipped)
        self._last: Optional[tuple[int, Optional[tuple[str, str]]]] = None  # (dataset, (shard, key)) of the last item
        self._kept: dict[tuple[str, str], int] = {}  # kept since the last yielded batch -> dataset

    def advance(self, entry: Entry) -> Optional[Item]:
        _, index, item = entry
        i, e, c = _mix_of(item)
        self.parts[i] = (e, c)
        self.consumed = index + 1
        where = None if isinstance(item, Damaged) else (item["__shard__"], item["__key__"])
        self._last = (i, where)
        return item

    def keep(self) -> None:
        super().keep()
        i, where = self._last  # type: ignore[misc]
        self.drawn[i] += 1
        if where is not None:
            self._kept[where] = i

    def skip(self, reason: str, key: Optional[str] = None, shard: Optional[str] = None) -> None:
        super().skip(reason, key, shard)
        kept = self._kept.pop((shard, key), None) if key is not None else None
        if kept is not None:  # decoded in a batch, then dropped (DALI): no longer drawn
            self.drawn[kept] -= 1
            self.part_skipped[kept] += 1
        else:
            self.part_skipped[self._last[0]] += 1  # type: ignore[index]

    def emit(self, batch_size: int) -> Position:
        self._kept.clear()
        return super().emit(batch_size)

    def position(self) -> MixturePosition:
        return MixturePosition(self.epoch, self.consumed, self.samples, self.skipped, tuple(self.parts),
                               tuple(self.drawn), tuple(self.part_skipped))


def make_stream(shards: Union[str, list[str], Sequence[MixturePart]], dp_rank: int, dp_size: int, seed: int,
                shuffle_buffer: int, num_epochs: Optional[int]) -> Union[SampleStream, MixtureStream]:
    """The loaders' stream: a ``MixtureStream`` for a list of ``MixturePart``s, else a ``SampleStream``."""
    if isinstance(shards, (list, tuple)) and shards and all(isinstance(p, MixturePart) for p in shards):
        if num_epochs is not None:
            raise ValueError(f"a mixture is endless (training); num_epochs={num_epochs} needs a single dataset")
        return MixtureStream(shards, dp_rank, dp_size, seed, shuffle_buffer)  # type: ignore[arg-type]
    return SampleStream(shards, dp_rank, dp_size, seed, shuffle_buffer, num_epochs)  # type: ignore[arg-type]
