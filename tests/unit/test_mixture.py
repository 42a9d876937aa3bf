"""Weighted mixtures of datasets: the draw, each dataset's own order, exact resume, counters, refusals.

The stream-level tests use tiny shards of fake image bytes (no decoding); the SimpleLoader
tests read real shapes images. The DALI loader, reader workers and the trainer (kill -9 and
resume) are in tests/integration/test_mixture_training.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os

import pytest

from tulip_mega.config import ConfigError, load_config
from tulip_mega.data.mixture import MIX_KEY, MixturePart, MixtureStream
from tulip_mega.data.sample_stream import SampleStream
from tulip_mega.data.shards import ShardWriter, expand_shards, iter_samples
from tulip_mega.data.simple_loader import SimpleLoader
from tulip_mega.data.tokenizer import Tokenizer


def _write(folder, counts: list[int], tag: str) -> list[str]:
    """Shards of ``counts[k]`` samples each, keys {tag}{k}_{i}."""
    paths = []
    for k, n in enumerate(counts):
        with ShardWriter(os.path.join(folder, f"{tag}{k}-%02d.tar"), n) as w:
            for i in range(n):
                w.write({"__key__": f"{tag}{k}_{i:03d}", "jpg": b"j" * (5 + i), "txt": f"caption {tag} {k} {i}"})
        paths += w.shards
    return paths


@pytest.fixture
def two_sets(tmp_path) -> tuple[list[str], list[str]]:
    # 21 samples in 3 uneven shards (a web set) and 4 in one (a small curated set): neither divides dp 2 or 3.
    return _write(tmp_path, [7, 5, 9], "a"), _write(tmp_path, [4], "b")


def _mixture(a, b, rank=0, dp=1, seed=5, weights=(3.0, 1.0)) -> MixtureStream:
    return MixtureStream([MixturePart("web", a, weights[0]), MixturePart("curated", b, weights[1])],
                         dp_rank=rank, dp_size=dp, seed=seed, shuffle_buffer=4)


def _own_keys(stream: SampleStream, n: int) -> list[str]:
    """The first n sample keys of a single stream over its epochs (what the dataset alone reads)."""
    out = []
    for epoch in itertools.count():
        for _, _, item in stream.entries(epoch, 0):
            if item is None:
                break
            out.append(item["__key__"])
        if len(out) >= n:
            return out[:n]
    raise AssertionError


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_each_dataset_keeps_its_own_order_and_the_draw_follows_the_weights(two_sets, dp: int) -> None:
    a, b = two_sets
    n = 6000
    for rank in range(dp):
        mix = _mixture(a, b, rank, dp)
        entries = list(itertools.islice(mix.entries(0, 0), n))
        assert [m for _, m, _ in entries] == list(range(n))
        by_set = {0: [], 1: []}
        for _, _, item in entries:
            by_set[item[MIX_KEY][0]].append(item["__key__"])
        # Each dataset's items are exactly that dataset's own stream (its order, split and epochs), in order.
        for i, shards in enumerate((a, b)):
            alone = SampleStream(shards, rank, dp, seed=5 + 7919 * (i + 1), shuffle_buffer=4)
            assert by_set[i] == _own_keys(alone, len(by_set[i]))
        # The realised share of the web set is 3/4 within 4 standard deviations of a binomial draw.
        share, sd = len(by_set[0]) / n, math.sqrt(0.75 * 0.25 / n)
        assert abs(share - 0.75) < 4 * sd, share
    # Different ranks draw differently (seeded by rank); the same rank draws the same.
    assert list(itertools.islice(_mixture(a, b).choices(0), 200)) == list(itertools.islice(_mixture(a, b).choices(0), 200))
    assert list(itertools.islice(_mixture(a, b, 1, 2).choices(0), 200)) != list(itertools.islice(_mixture(a, b, 0, 2).choices(0), 200))
    # The draw at a position does not depend on where reading started (resume mid-block).
    assert list(itertools.islice(_mixture(a, b).choices(4090), 20)) == list(itertools.islice(_mixture(a, b).choices(0), 4110))[4090:]


def test_the_committed_position_resumes_every_dataset_exactly(two_sets) -> None:
    a, b = two_sets
    mix = _mixture(a, b, 1, 2)
    entries = list(itertools.islice(mix.entries(0, 0), 300))
    cursor = mix.cursor()
    for batch in range(7):  # batches of 9 (every dataset crosses several of its epochs)
        for entry in entries[batch * 9:(batch + 1) * 9]:
            cursor.advance(entry)
            cursor.keep()
        mix.position = cursor.emit(9)
    state = json.loads(json.dumps(mix.state_dict()))
    resumed = _mixture(a, b, 1, 2)
    resumed.load_state_dict(state)
    assert [e[2]["__key__"] for e in itertools.islice(resumed.entries(0, 63), 200)] == \
        [e[2]["__key__"] for e in entries[63:263]]
    stats = resumed.stats()
    web = sum(1 for e in entries[:63] if e[2][MIX_KEY][0] == 0)
    assert stats == {"samples": 63, "skipped": 0, "samples/web": web, "samples/curated": 63 - web,
                     "skipped/web": 0, "skipped/curated": 0}
    with pytest.raises(ValueError, match="committed position 63"):
        next(resumed.entries(0, 10))


def test_other_mixtures_and_single_dataset_states_are_refused(two_sets) -> None:
    a, b = two_sets
    state = _mixture(a, b, 0, 2).state_dict()
    with pytest.raises(ValueError, match=r"weights=\[3.0, 1.0\].*weights=\[1.0, 1.0\]"):
        _mixture(a, b, 0, 2, weights=(1.0, 1.0)).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_size=2 but this mixture has dp_size=3"):
        _mixture(a, b, 0, 3).load_state_dict(state)
    extra = _write(os.path.dirname(b[0]), [3], "c")
    with pytest.raises(ValueError, match="mixture dataset 'curated': .*num_shards=1 but this loader has num_shards=2"):
        MixtureStream([MixturePart("web", a, 3), MixturePart("curated", b + extra, 1)], 0, 2, 5, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="a shard may belong to one dataset only"):
        MixtureStream([MixturePart("web", a, 3), MixturePart("curated", b + a[:1], 1)], 0, 2, 5, 4)
    with pytest.raises(ValueError, match="single-dataset run"):
        _mixture(a, b).load_state_dict(SampleStream(a).state_dict())
    with pytest.raises(ValueError, match=r"mixture of datasets \['web', 'curated'\]"):
        SampleStream(a).load_state_dict(_mixture(a, b).state_dict())
    with pytest.raises(ValueError, match="weight <= 0"):
        MixtureStream([MixturePart("web", a, 0.0)])
    with pytest.raises(ValueError, match="unique"):
        MixtureStream([MixturePart("web", a, 1.0), MixturePart("web", b, 1.0)])


def test_recipe_key_data_mixture(tmp_path, two_sets) -> None:
    from tulip_mega.training.data import train_datasets

    a, b = two_sets
    folder = os.path.dirname(a[0])
    cfg = load_config(None, [f"data.mixture=[{{shards: '{folder}/a*.tar', weight: 3, name: web}}, "
                             f"{{shards: '{b[0]}'}}]"])
    parts = train_datasets(cfg)
    assert parts == [MixturePart("web", sorted(a), 3.0), MixturePart("dataset1", b, 1.0)]
    with pytest.raises(ConfigError, match=r"unknown key 'data.mixture\[1\].wieght'"):
        load_config(None, ["data.mixture=[{shards: x}, {shards: y, wieght: 2}]"])
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].weight=-1.0 must be > 0"):
        load_config(None, ["data.mixture=[{shards: x, weight: -1}]"])
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(None, ["data.mixture=[{shards: x, name: w}, {shards: y, name: w}]"])
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"data:\n  mixture:\n    - {{shards: '{b[0]}', weight: 2, name: cur}}\n"
                      f"    - {{shards: '{folder}/missing-{{00..01}}.tar', name: web}}\n")
    cfg = load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"data.mixture\[1\] \(web\): .*missing-00.tar"):
        train_datasets(cfg)


# --------------------------------------------------------------------------- SimpleLoader on real images


@pytest.fixture(scope="module")
def tok(shapes_data) -> Tokenizer:
    return Tokenizer(shapes_data["tokenizer"], context_length=16)


def test_simple_loader_mixture_counts_resumes_and_skips_per_dataset(shapes_data, tok, tmp_path, caplog) -> None:
    shards = expand_shards(shapes_data["train"])
    web, curated_src = shards[:3], shards[3]
    # The curated set: 40 samples of one shard, two of them bad (no caption; garbage image), then cut.
    samples = list(itertools.islice(iter_samples(curated_src), 40))
    with ShardWriter(str(tmp_path / "cur-%02d.tar"), 100) as w:
        for i, s in enumerate(samples):
            s = {k: v for k, v in s.items() if k != "__shard__"}
            if i == 5:
                del s["txt"]
            if i == 9:
                s["jpg"] = b"not an image" * 5
            w.write(s)
    cur = w.shards[0]
    with open(cur, "r+b") as f:  # a cut shard: the tail's samples are lost and the damage counted once
        f.truncate(os.path.getsize(cur) * 6 // 10)
    survivors = sum(1 for _ in SampleStream([cur], num_epochs=1).entries(0, 0)) - 2  # less the damage and the end
    assert 20 < survivors < 40
    parts = [MixturePart("web", web, 1.0), MixturePart("curated", [cur], 1.0)]

    def make(rank: int = 1) -> SimpleLoader:
        return SimpleLoader(parts, batch_size=8, image_size=32, tokenizer=tok, dp_rank=rank, dp_size=2, seed=3,
                            shuffle_buffer=16)

    caplog.set_level(logging.WARNING)
    cur_keys = {s["__key__"] for s in samples}
    skipped = 0
    for rank in (0, 1):
        loader = make(rank)
        batches = list(itertools.islice(loader, 30))  # 240 samples: the curated set's share cycles it ~10 times
        stats = loader.stats()
        keys = [k for x in batches for k in x.keys]
        assert stats["samples"] == 240 == stats["samples/web"] + stats["samples/curated"]
        assert stats["samples/curated"] == sum(k in cur_keys for k in keys)
        assert 0.4 < stats["samples/curated"] / 240 < 0.6
        assert stats["skipped"] == stats["skipped/web"] + stats["skipped/curated"] and stats["skipped/web"] == 0
        assert samples[5]["__key__"] not in keys and samples[9]["__key__"] not in keys
        skipped += stats["skipped/curated"]
    # Both ranks together pass over the curated set >= 8 times: its 2 bad samples and the cut each time.
    assert skipped >= 8 * 3
    assert "truncated" in caplog.text and cur in caplog.text and "missing caption" in caplog.text
    # Exact resume after batch 11: the same batches, images bit-identical, and the same counters.
    first = make()
    it = iter(first)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    for want, got in zip(batches[11:], itertools.islice(second, 19)):
        assert got.keys == want.keys and (got.images == want.images).all() and (got.tokens == want.tokens).all()
    assert second.stats() == stats


def test_an_energon_metadataset_blend_trains_as_a_mixture(tmp_path) -> None:
    """data.train_shards=blend.yaml (energon MetadatasetV2): each blend path is an energon dataset
    folder (its split.yaml's train shards), weighted as the YAML says."""
    from tulip_mega.training.data import mixture_names, train_datasets

    folders = {}
    for name, counts in (("laion", [6, 5]), ("coco", [4])):
        root = tmp_path / name
        root.mkdir()
        shards = _write(root, counts, name)
        (root / ".nv-meta").mkdir()
        names = "".join(f"    - {os.path.basename(s)}\n" for s in shards)
        (root / ".nv-meta" / "split.yaml").write_text(f"split_parts:\n  train:\n{names}exclude: []\n")
        folders[name] = shards
    blend = tmp_path / "blend.yaml"
    blend.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
                     "      - {weight: 4, path: laion}\n      - {weight: 1, path: ./coco}\n")
    cfg = load_config(None, [f"data.train_shards={blend}"])
    assert train_datasets(cfg) == [MixturePart("laion", folders["laion"], 4.0), MixturePart("coco", folders["coco"], 1.0)]
    assert mixture_names(cfg) == ["laion", "coco"]
    blend.write_text(blend.read_text().replace("path: ./coco", "path: ./coco, subflavors: {a: 1}"))
    with pytest.raises(ConfigError, match=r"blend.yaml.*subflavors"):
        train_datasets(load_config(None, [f"data.train_shards={blend}"]))
