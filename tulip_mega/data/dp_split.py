"""How the data-parallel ranks split the samples: contiguous, equal sample ranges per round.

Why: splitting whole shards over ranks (rank r reads every dp-th shard) gives the ranks
different numbers of samples whenever the shards do not divide evenly, and ranks that step
in lockstep then repeat some shards and skip others within an epoch. Here the unit is the
sample, and each rank still reads mostly whole shards in sequence (cheap I/O):

- The global stream G is epoch 0's samples, then epoch 1's, ...; an epoch is every shard in
  the seeded order of ``shard_order(seed, epoch)``, each shard's samples in tar order.
- Round e covers G[dp * floor(e N / dp), dp * floor((e+1) N / dp)) for N samples per epoch and
  dp ranks: a multiple of dp samples, cut into dp contiguous ranges of equal length, range r
  for rank r. Every sample of G is read exactly once, by one rank, and all ranks read the same
  number of samples per round, so ranks stepping in lockstep stay aligned forever.
- When dp divides N, round e is epoch e. Otherwise the last N mod dp samples of the epoch's
  order (< dp) are carried into the next round, which starts with them; nothing is dropped
  and the rounds realign with the epochs every dp / gcd(N, dp) epochs.
- A finite loader (``num_epochs`` = K, eval) ends its last round at K N, so it reads every
  sample of its K epochs; the ranks' shares of that last round then differ by at most one.

A rank's range becomes ``ShardSlice``s: the samples [start, stop) of a shard in tar order.
Sample counts come from the DALI index files (``tulip-mega data index``, local shards only) when
they are up to date, else from ``.nv-meta/tulip_counts.json`` (``tulip-mega data prepare``) when the
shard's size and mtime are those recorded, else from reading the shards once at start-up
(object-store shards: every rank fetches every shard once to count it). A damaged shard counts
the samples read before the damage; exactly one slice per shard and epoch (``ends``) reads on to
the shard's end, so the damage is reported (and counted as skipped) once, by one rank.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from tulip_mega.data import object_store
from tulip_mega.data.dali_index import index_path
from tulip_mega.data.shard_counts import recorded_count
from tulip_mega.data.shards import ShardReadError, iter_samples

__all__ = ["ShardSlice", "count_samples", "rank_range", "rank_slices", "read_slice", "round_start", "shard_order",
           "shard_sizes"]

logger = logging.getLogger(__name__)

WHOLE = sys.maxsize  # ``stop`` of a slice that reads a shard to its end (dp_size 1 needs no counts)
SPLIT_NAME = "sample-ranges"  # the loader state's "dp_split": which split its positions refer to


@dataclass(frozen=True)
class ShardSlice:
    """Samples [start, stop) of ``shard`` in tar order; ``ends``: read on to the shard's end
    (past ``stop`` without yielding), so its damage is reported by this slice."""

    shard: str
    start: int = 0
    stop: int = WHOLE
    ends: bool = True


def shard_order(shards: list[str], seed: int, epoch: int) -> list[int]:
    """Indices of ``shards`` in epoch ``epoch``'s read order (a seeded permutation)."""
    order = list(range(len(shards)))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


# Counts by reading, per (path, size, mtime) or (URL, size, last modified): eval builds a
# loader per evaluation, and re-reading an object-store shard means fetching it again.
_COUNTED: dict[tuple[str, int, Any], int] = {}


def _count_key(shard: str) -> Optional[tuple[str, int, Any]]:
    """What identifies this version of the shard: (path, size, mtime), for a URL the object's
    (size, last modified) from the store; None (no caching) when neither can be had."""
    if object_store.is_url(shard):
        stamp = object_store.object_stamp(shard)
        return None if stamp is None else (shard, *stamp)
    try:
        st = os.stat(shard)
    except OSError:
        return None
    return os.path.abspath(shard), st.st_size, st.st_mtime


def count_samples(shard: str) -> int:
    """Samples ``iter_samples`` yields for ``shard`` (for a damaged shard: those before the damage)."""
    key = _count_key(shard)
    if key is not None and key in _COUNTED:
        return _COUNTED[key]
    n = 0
    try:
        for _ in iter_samples(shard):
            n += 1
    except ShardReadError:
        pass
    if key is not None:
        _COUNTED[key] = n
    return n


def _indexed_count(shard: str, index_dir: Optional[str]) -> Optional[int]:
    """The sample count in ``shard``'s DALI index when the index is at least as new as the shard;
    None for an object-store shard (index files sit beside local shards only). Read as bytes:
    energon writes its binary tar index under the same name (``<shard>.idx``)."""
    if object_store.is_url(shard):
        return None
    path = index_path(shard, index_dir)
    try:
        if os.path.getmtime(path) < os.path.getmtime(shard):
            return None
        with open(path, "rb") as f:
            head = f.readline(64).split()
    except OSError:
        return None
    if len(head) == 2 and head[0].startswith(b"v1") and head[1].isdigit():
        return int(head[1])
    return None


def shard_sizes(shards: list[str], index_dir: Optional[str] = None) -> list[int]:
    """Samples per shard: from up-to-date index files, else from the counts `data prepare`
    recorded (``shard_counts``: same size and mtime), else by reading the shard once.

    A recorded count is our reader's, as ``count_samples`` would give. An index leaves out a
    damaged shard's partial last sample, which a count by reading keeps; both are consistent as
    long as every rank uses the same source (same files)."""
    sizes: list[int] = []
    counted = 0
    for shard in shards:
        n = _indexed_count(shard, index_dir)
        if n is None:
            n = recorded_count(shard)
        if n is None:
            n, counted = count_samples(shard), counted + 1
        sizes.append(n)
    if counted > 64:
        logger.warning("counted the samples of %d shards by reading them (no up-to-date .idx files); "
                       "`tulip-mega data index --data SPEC` (or `data prepare FOLDER`) records the counts once "
                       "and makes start-up cheap", counted)
    return sizes


def round_start(round_: int, num_samples: int, dp_size: int) -> int:
    """G position where round ``round_`` starts: the largest multiple of dp_size <= round_ N."""
    return dp_size * (round_ * num_samples // dp_size)


def rank_range(round_: int, num_samples: int, dp_rank: int, dp_size: int,
               num_epochs: Optional[int] = None) -> tuple[int, int]:
    """G positions [lo, hi) rank ``dp_rank`` reads in round ``round_`` (see the module doc)."""
    lo = round_start(round_, num_samples, dp_size)
    final = num_epochs is not None and round_ == num_epochs - 1
    hi = (round_ + 1) * num_samples if final else round_start(round_ + 1, num_samples, dp_size)
    span = hi - lo
    return lo + dp_rank * span // dp_size, lo + (dp_rank + 1) * span // dp_size


def rank_slices(shards: list[str], sizes: list[int], seed: int, round_: int, dp_rank: int, dp_size: int,
                num_epochs: Optional[int] = None) -> list[ShardSlice]:
    """The slices of rank ``dp_rank``'s range in round ``round_``, in read order.

    A shard of n samples at G positions [g, g + n) is reported (``ends``: its damage) by the
    rank whose range holds position g + n - 1; an empty one by the holder of g (or of the
    epoch's last position, when it comes last)."""
    total = sum(sizes)
    lo, hi = rank_range(round_, total, dp_rank, dp_size, num_epochs)
    out: list[ShardSlice] = []
    for epoch in range(lo // total, (hi - 1) // total + 1):
        g, end = epoch * total, (epoch + 1) * total
        for k in shard_order(shards, seed, epoch):
            n = sizes[k]
            start, stop = max(g, lo), min(g + n, hi)
            last = min(g + max(n, 1) - 1, end - 1)
            ends = lo <= last < hi
            if start < stop or (n == 0 and ends):
                out.append(ShardSlice(shards[k], start - g if n else 0, stop - g if n else 0, ends))
            g += n
    return out


def read_slice(piece: ShardSlice, offsets: bool = False) -> Iterator[dict[str, Any]]:
    """The samples of ``piece`` as ``iter_samples`` gives them; a ShardReadError of the shard is
    raised only by the slice that ``ends`` it (after its samples), the others stop early."""
    if piece.start == 0 and piece.stop == WHOLE:
        yield from iter_samples(piece.shard, offsets)
        return
    seen = 0
    for i, item in enumerate(iter_samples(piece.shard, offsets)):
        seen = i + 1
        if i >= piece.stop:
            if not piece.ends:
                return
            if not item.get("__partial__"):
                logger.warning("shard %s has more samples than its count %d (an index older than the shard?); "
                               "sample %r is left out", piece.shard, piece.stop, item["__key__"])
            continue
        if i >= piece.start:
            yield item
    if seen < piece.stop:
        logger.warning("shard %s has %d samples, fewer than its count %d (changed since it was counted?); "
                       "this rank reads fewer samples than the others this round", piece.shard, seen, piece.stop)
