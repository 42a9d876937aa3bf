"""Every sample once per epoch over data-parallel ranks stepping in lockstep (tulip_mega/data/dp_split.py).

The ranks' loaders are drawn from in lockstep, as the trainer does (one micro-batch per rank
per step), over uneven shard counts and sizes, for the PIL loader and the DALI loader (CPU,
0 and 2 reader workers). References come from reading the shards with ``iter_samples``.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import tarfile

import pytest
import torch

from tulip_mega.data import ShardWriter, SimpleLoader, Tokenizer, iter_samples, train_tokenizer_from_shards
from tulip_mega.data.dali_index import build_index
from tulip_mega.data.dp_split import count_samples, shard_order, shard_sizes
from tulip_mega.datagen.synthetic import write_shapes_dataset

KINDS = ["simple", "dali-0", "dali-2"]  # loader, reader workers


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("split")
    info = write_shapes_dataset(str(out / "even"), 96, 16, 16, image_size=32, seed=11)  # 6 shards of 16
    model = train_tokenizer_from_shards(info["train_spec"], str(out / "spm"), 512)
    samples = [s for shard in info["train_shards"] for s in iter_samples(shard)]
    uneven, at = [], 0
    for i, size in enumerate((5, 16, 16, 9, 16, 16)):  # 78 samples: no DP size from 4 up divides it
        with ShardWriter(str(out / f"uneven-{i}-%d.tar"), 100) as w:
            for s in samples[at:at + size]:
                w.write({k: v for k, v in s.items() if k != "__shard__"})
        uneven += w.shards
        at += size
    return {"even": info["train_shards"], "uneven": uneven, "tok": Tokenizer(model, context_length=16)}


def keys_of(shards: list[str]) -> list[str]:
    return [s["__key__"] for shard in shards for s in iter_samples(shard)]


def make(kind: str, shards: list[str], tok: Tokenizer, batch: int, rank: int, dp: int, **kw):
    kw.setdefault("seed", 3)
    kw.setdefault("shuffle_buffer", 8)
    if kind == "simple":
        return SimpleLoader(shards, batch, 32, tok, dp_rank=rank, dp_size=dp, **kw)
    pytest.importorskip("nvidia.dali")
    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan

    workers = int(kind.split("-")[1])
    return DaliLoader(shards, batch, ViewPlan(image_size=32), tok, dp_rank=rank, dp_size=dp, gpu=False, threads=1,
                      prefetch=0, reader_workers=workers, chunk_size=8, read_chunk_size=8, **kw)


def lockstep(loaders: list, steps: int) -> list[list]:
    """``steps`` steps of one batch from every rank's loader, as the trainer draws them."""
    its = [iter(ld) for ld in loaders]
    out = [[next(it) for it in its] for _ in range(steps)]
    for it in its:
        it.close()  # stops reader workers
    return out


def step_keys(steps: list[list]) -> list[str]:
    return [k for step in steps for batch in step for k in batch.keys]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shards,dp,batch,epochs", [
    ("even", 4, 3, 1),  # 6 shards of 16 over 4 ranks: 8 steps of 12 are one epoch
    ("uneven", 3, 2, 1),  # shards of 5, 16, 16, 9, 16, 16: 13 steps of 6
    ("uneven", 4, 3, 2),  # 4 does not divide 78: two epochs (13 steps of 12) read every sample twice
    ("uneven", 5, 6, 5),  # 5 ranks, 6 shards: five epochs, 13 steps of 30
])
def test_lockstep_reads_every_sample_once_per_epoch(data, kind, shards, dp, batch, epochs) -> None:
    files = data[shards]
    everything = keys_of(files)
    steps = epochs * len(everything) // (dp * batch)
    assert steps * dp * batch == epochs * len(everything)
    got = lockstep([make(kind, files, data["tok"], batch, r, dp) for r in range(dp)], steps)
    assert collections.Counter(step_keys(got)) == collections.Counter(everything * epochs)


@pytest.mark.parametrize("kind", KINDS[:2])
def test_epoch_boundary_carries_the_remainder_into_the_next_round(data, kind) -> None:
    """78 samples over 4 ranks: round 0 is the first 76 of epoch 0's order (19 per rank), the
    last 2 open round 1 (with all 78 of epoch 1: 20 per rank); nothing is dropped or repeated."""
    files, dp, seed = data["uneven"], 4, 3
    loaders = [make(kind, files, data["tok"], 1, r, dp, seed=seed, shuffle_buffer=0) for r in range(dp)]
    order = [k for e in (0, 1) for i in shard_order(files, seed, e) for k in keys_of([files[i]])]
    its = [iter(ld) for ld in loaders]
    first = [[next(it).keys[0] for _ in range(19)] for it in its]
    assert [ld.epoch for ld in loaders] == [0] * dp
    assert [k for rank in first for k in rank] == order[:76]  # contiguous ranges, rank by rank
    second = [[next(it).keys[0] for _ in range(20)] for it in its]
    assert [ld.epoch for ld in loaders] == [1] * dp
    assert [k for rank in second for k in rank] == order[76:156]
    assert order[76:78] == second[0][:2]  # the carried tail of epoch 0 opens rank 0's round 1
    for it in its:
        it.close()


@pytest.mark.parametrize("kind", ["simple", "dali-2"])
def test_exact_resume_mid_round_with_uneven_shards(data, kind) -> None:
    """Lockstep over 4 ranks, 5 per batch (19, then 20 samples per rank per round): stopping
    after 3 steps (mid round) or 4 (the batch spans rounds) and resuming from the JSON states
    gives every rank the very batches of the uninterrupted run."""
    files, dp = data["uneven"], 4
    ref = lockstep([make(kind, files, data["tok"], 5, r, dp) for r in range(dp)], 9)
    for stop in (3, 4):
        first = [make(kind, files, data["tok"], 5, r, dp) for r in range(dp)]
        lockstep(first, stop)
        states = [json.loads(json.dumps(ld.state_dict())) for ld in first]
        resumed = [make(kind, files, data["tok"], 5, r, dp) for r in range(dp)]
        for ld, state in zip(resumed, states):
            ld.load_state_dict(state)
        for want, got in zip(ref[stop:], lockstep(resumed, 9 - stop)):
            for a, b in zip(want, got):
                assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


def test_old_whole_shard_states_are_refused_for_dp_above_one(data) -> None:
    files, tok = data["uneven"], data["tok"]
    state = SimpleLoader(files, 4, 32, tok, dp_rank=1, dp_size=2).state_dict()
    old = {k: v for k, v in state.items() if k not in ("dp_split", "epoch_samples")}
    with pytest.raises(ValueError, match=r"dp_split=None.*whole-shard.*every dp_size-th shard.*'sample-ranges'"):
        SimpleLoader(files, 4, 32, tok, dp_rank=1, dp_size=2).load_state_dict(old)
    with pytest.raises(ValueError, match="epoch_samples=79 but this loader has epoch_samples=78"):
        SimpleLoader(files, 4, 32, tok, dp_rank=1, dp_size=2).load_state_dict({**state, "epoch_samples": 79})
    one = SimpleLoader(files, 4, 32, tok)  # one rank: the stream is unchanged, its old states load
    one.load_state_dict({k: v for k, v in one.state_dict().items() if k not in ("dp_split", "epoch_samples")})


def test_fewer_samples_than_ranks_is_refused(data) -> None:
    with pytest.raises(ValueError, match="hold 5 readable samples, fewer than dp_size=8"):
        SimpleLoader(data["uneven"][:1], 1, 32, data["tok"], dp_rank=0, dp_size=8)


def test_sizes_from_index_files_match_reading(data, tmp_path) -> None:
    """Index files (``tulip-mega data index``) give the counts without reading the shards; a
    damaged shard's index leaves out its partial last sample, a count by reading keeps it."""
    files = data["uneven"]
    idx = str(tmp_path / "idx")
    for f in files:
        build_index(f, idx)
    assert shard_sizes(files, idx) == shard_sizes(files) == [5, 16, 16, 9, 16, 16]
    cut = str(tmp_path / "cut.tar")
    shutil.copy(files[1], cut)
    _cut_inside(cut, f"{keys_of([files[1]])[8]}.txt")  # sample 8 keeps its image: a partial sample
    assert count_samples(cut) == 9  # 8 intact + the partial one
    assert build_index(cut, idx).samples == 8
    assert shard_sizes([cut], idx) == [8] and shard_sizes([cut]) == [9]


def _cut_inside(shard: str, member: str) -> None:
    """Truncate ``shard`` 10 bytes into the data of ``member``."""
    with tarfile.open(shard) as tf:
        offset = tf.getmember(member).offset_data
    with open(shard, "rb") as f:
        blob = f.read()
    with open(shard, "wb") as f:
        f.write(blob[: offset + 10])


@pytest.mark.parametrize("kind", KINDS[:2])
def test_bad_samples_are_skipped_not_replaced(data, kind, tmp_path, caplog) -> None:
    """A bad sample is skipped and counted, not replaced: its rank's round yields one good
    sample fewer and its batches fill up from the next round. Over finite epochs (eval) the
    ranks together yield every good sample exactly once, and a truncated shard split over
    ranks is counted once, by the rank whose slice ends it."""
    src = [{k: v for k, v in s.items() if k != "__shard__"} for f in data["uneven"] for s in iter_samples(f)][:34]
    bad = {src[4]["__key__"], src[17]["__key__"]}
    with ShardWriter(str(tmp_path / "bad-%d.tar"), 10) as w:  # shards of 10, 10, 10, 4
        for s in src:
            w.write({**s, "jpg": s["jpg"][: len(s["jpg"]) // 2]} if s["__key__"] in bad else s)
    shards = w.shards
    _cut_inside(shards[2], f"{src[23]['__key__']}.jpg")  # 3 samples survive: 27 per epoch
    good = {s["__key__"] for s in src[:23] + src[30:]} - bad
    assert shard_sizes(shards) == [10, 10, 3, 4]
    caplog.set_level(logging.WARNING)
    for dp in (2, 3):
        loaders = [make(kind, shards, data["tok"], 4, r, dp, num_epochs=1) for r in range(dp)]
        keys = [k for ld in loaders for b in ld for k in b.keys]
        assert collections.Counter(keys) == collections.Counter(good)
        assert sum(ld.stats()["skipped"] for ld in loaders) == 3  # 2 images + 1 truncated shard
        assert caplog.text.count(f"skipping rest of shard: shard {shards[2]}") == 1
        caplog.clear()
    # Infinite loaders in lockstep over round 0 (9 samples per rank): every good sample once,
    # plus one sample of round 1 for each bad one (the rank holding it reads ahead).
    got = step_keys(lockstep([make(kind, shards, data["tok"], 1, r, 3) for r in range(3)], 9))
    extra = collections.Counter(got) - collections.Counter(good)
    assert not collections.Counter(good) - collections.Counter(got)
    assert sum(extra.values()) == len(bad) and set(extra) <= good


def test_each_rank_reads_at_most_two_shards_in_part(data) -> None:
    """The I/O stays shard-sequential, and each shard's end (its damage report) is one rank's."""
    files = data["even"]
    for dp in (4, 8):  # 96 samples: round 0 is epoch 0
        ranks = [SimpleLoader(files, 4, 32, data["tok"], dp_rank=r, dp_size=dp) for r in range(dp)]
        for ld in ranks:
            assert len([s for s in ld.stream.epoch_slices(0) if (s.start, s.stop) != (0, 16)]) <= 2
        ends = collections.Counter(s.shard for ld in ranks for s in ld.stream.epoch_slices(0) if s.ends)
        assert ends == collections.Counter(files)


def test_eval_shares_are_balanced(data) -> None:
    """A finite loader's last round ends at the epoch's end: shares differ by at most one."""
    files = data["uneven"]
    shares = []
    for r in range(5):
        ld = SimpleLoader(files, 100, 32, data["tok"], dp_rank=r, dp_size=5, shuffle_buffer=0, num_epochs=1)
        shares.append([k for b in ld for k in b.keys])
    assert [len(s) for s in shares] == [15, 16, 15, 16, 16]
    assert sorted(k for s in shares for k in s) == sorted(keys_of(files))
