"""SampleStream on its own: the DP split, the resumable position and the damage accounting."""

from __future__ import annotations

import itertools
import logging

import pytest

from tulip_mega.data.dp_split import ShardSlice, shard_order
from tulip_mega.data.sample_stream import Cursor, Damaged, Position, SampleStream, read_caption
from tulip_mega.data.shards import ShardWriter


def _write(tmp_path, counts: list[int]) -> list[str]:
    """Shards holding ``counts[i]`` samples each, keys s{shard}_{i}."""
    paths = []
    for k, n in enumerate(counts):
        with ShardWriter(str(tmp_path / f"t{k}-%02d.tar"), max(n, 1)) as w:
            for i in range(n):
                w.write({"__key__": f"s{k}_{i:03d}", "jpg": b"j" * (10 + i), "txt": f"caption {k} {i}"})
        paths += w.shards
    return paths


def _keys(stream: SampleStream, epoch: int) -> list[str]:
    return [e[2]["__key__"] for e in itertools.takewhile(lambda e: e[2] is not None, stream.entries(epoch, 0))]


@pytest.mark.parametrize("dp_size", [2, 3, 4])
def test_dp_split_reads_every_sample_once_when_shards_do_not_divide(tmp_path, dp_size: int) -> None:
    shards = _write(tmp_path, [7, 5, 9, 3, 6])  # 5 shards of unequal size, 30 samples
    ranks = [SampleStream(shards, r, dp_size, seed=3, shuffle_buffer=4) for r in range(dp_size)]
    total = 30
    seen: list[str] = []
    for epoch in range(dp_size):  # the rounds realign with the epochs after dp / gcd(N, dp) of them
        rows = [_keys(s, epoch) for s in ranks]
        assert len({len(r) for r in rows}) == 1, [len(r) for r in rows]  # lockstep: equal shares per round
        seen += [k for r in rows for k in r]
    every = sorted(f"s{k}_{i:03d}" for k, n in enumerate([7, 5, 9, 3, 6]) for i in range(n))
    assert sorted(seen) == sorted(every * dp_size) and len(seen) == total * dp_size


def test_one_rank_reads_whole_shards_in_the_seeded_order(tmp_path) -> None:
    shards = _write(tmp_path, [4, 4, 4])
    stream = SampleStream(shards, seed=1, shuffle_buffer=0)
    assert stream.sizes is None  # no counting needed
    assert sorted(stream.epoch_shards(0)) == sorted(shards)
    assert stream.epoch_slices(0) == [ShardSlice(shards[k]) for k in shard_order(shards, 1, 0)]
    assert _keys(stream, 0) == [k for p in stream.epoch_shards(0) for k in _keys(SampleStream([p], shuffle_buffer=0), 0)]


def test_entries_replay_a_position_and_end_each_epoch(tmp_path) -> None:
    shards = _write(tmp_path, [5, 6])
    stream = SampleStream(shards, seed=0, shuffle_buffer=3, num_epochs=2)
    everything = list(stream.entries(0, 0))
    ends = [e for e in everything if e[2] is None]
    assert ends == [(0, -1, None), (1, -1, None)]
    assert [e[:2] for e in everything[:11]] == [(0, i) for i in range(11)]
    resumed = list(stream.entries(0, 7))  # the first 7 items are read again, not handed out
    assert resumed == everything[7:]


def test_position_round_trips_through_the_state(tmp_path) -> None:
    shards = _write(tmp_path, [5, 6, 4])
    stream = SampleStream(shards, dp_rank=1, dp_size=2, seed=4, shuffle_buffer=2)
    stream.position = Position(epoch=3, consumed=5, samples=40, skipped=2)
    state = stream.state_dict()
    assert state["dp_split"] == "sample-ranges" and state["epoch_samples"] == 15
    other = SampleStream(shards, dp_rank=1, dp_size=2, seed=4, shuffle_buffer=2)
    other.load_state_dict(state)
    assert other.position == stream.position and other.state_dict() == state
    assert other.stats() == {"samples": 40, "skipped": 2}
    with pytest.raises(ValueError, match="dp_rank=1 but this loader has dp_rank=0"):
        SampleStream(shards, dp_rank=0, dp_size=2, seed=4, shuffle_buffer=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_size=2 but this run has dp_size=3"):
        SampleStream(shards, dp_rank=1, dp_size=3, seed=4, shuffle_buffer=2).load_state_dict(state)


def test_cursor_counts_skips_and_commits_positions(tmp_path, caplog) -> None:
    shards = _write(tmp_path, [3])
    stream = SampleStream(shards, num_epochs=1, shuffle_buffer=0)
    stream.position = Position(samples=8, skipped=1)
    cursor = stream.cursor()
    caplog.set_level(logging.WARNING)
    for entry in stream.entries(cursor.epoch, cursor.consumed):
        item = cursor.advance(entry)
        if item is not None and item["__key__"].endswith("1"):
            cursor.skip_item(item, "planted")
        elif item is not None:
            cursor.keep()
    cursor.skip_item(Damaged(shards[0], "shard cut"), "shard cut")
    assert cursor.emit(2) == Position(epoch=1, consumed=0, samples=10, skipped=3)
    assert stream.position == Position(samples=8, skipped=1)  # nothing committed by the cursor itself
    assert "skipping sample 's0_001' in shard" in caplog.text and "skipping rest of shard: shard cut" in caplog.text


def test_an_epoch_without_usable_samples_is_an_error_unless_resumed(tmp_path) -> None:
    shards = _write(tmp_path, [2])
    stream = SampleStream(shards, num_epochs=1)
    cursor = Cursor(stream, Position())
    with pytest.raises(RuntimeError, match="epoch 0 produced no usable samples"):
        for entry in stream.entries(0, 0):
            cursor.advance(entry)  # nothing kept
    resumed = Cursor(stream, Position(consumed=1))
    for entry in stream.entries(0, 1):
        resumed.advance(entry)
    assert resumed.position() == Position(epoch=1)


def test_damaged_shards_flow_through_once_per_epoch_after_their_good_samples(tmp_path) -> None:
    shards = _write(tmp_path, [6, 4])
    data = open(shards[0], "rb").read()
    with open(shards[0], "wb") as f:
        f.write(data[: len(data) // 2])  # cut inside the shard: 5 good samples (one partial) survive
    for dp_size in (1, 2):  # 9 samples: dp_size rounds are dp_size whole epochs
        streams = [SampleStream(shards, r, dp_size, shuffle_buffer=4) for r in range(dp_size)]
        items = [e[2] for s in streams for epoch in range(dp_size)
                 for e in itertools.takewhile(lambda e: e[2] is not None, s.entries(epoch, 0))]
        damaged = [i for i in items if isinstance(i, Damaged)]
        assert [d.shard for d in damaged] == [shards[0]] * dp_size  # counted once per epoch, by one rank
        assert all("truncated" in d.message for d in damaged)
        samples = [i for i in items if isinstance(i, dict)]
        assert len(samples) == 9 * dp_size and sum(bool(i.get("__partial__")) for i in samples) == dp_size


def test_read_caption_says_why_a_sample_is_dropped() -> None:
    assert read_caption({"jpg": b"x", "txt": b"a cat"}) == ("a cat",)
    assert read_caption({"jpg": b"x"}) == "missing caption (.txt)"
    assert read_caption({"txt": b"x", "__partial__": True}) is None  # the damaged shard counts it
    assert read_caption({"jpg": b"x", "txt": b"\xff"}).startswith("caption is not valid UTF-8")
    assert read_caption({"jpg": b"x", "txt": b"  "}) == "empty caption"
    assert read_caption(Damaged("a.tar", "boom")) == "boom"
