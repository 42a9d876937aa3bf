"""Tests for tulip_mega.data: shards, synthetic data, tokenizer and the simple loader."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tulip_mega.data import (
    Batch,
    BatchLoader,
    ShardReadError,
    ShardWriter,
    SimpleLoader,
    Tokenizer,
    expand_shards,
    iter_samples,
    train_tokenizer_from_shards,
)
from tulip_mega.datagen.synthetic import COLOURS, FOREGROUNDS, SHAPES, write_shapes_dataset

NUM_TRAIN, NUM_VAL, PER_SHARD, SIZE = 96, 32, 16, 48


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_shapes_dataset(
        str(tmp_path_factory.mktemp("shapes")), NUM_TRAIN, NUM_VAL, PER_SHARD, image_size=SIZE, seed=3
    )


@pytest.fixture(scope="module")
def tok(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    model = train_tokenizer_from_shards(data["train_spec"], str(tmp_path_factory.mktemp("tok") / "spm"), 1024)
    return Tokenizer(model, context_length=16)


def all_keys(shards: list[str]) -> list[str]:
    return [s["__key__"] for shard in shards for s in iter_samples(shard)]


def take_keys(loader: SimpleLoader, n: int) -> list[str]:
    """The first n keys of the loader's batch stream (batches may span epochs)."""
    keys: list[str] = []
    for batch in loader:
        keys.extend(batch.keys)
        if len(keys) >= n:
            return keys[:n]
    return keys


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(np.abs(np.array(COLOURS[c]) - rgb).sum()))


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic(tmp_path) -> None:
    a = write_shapes_dataset(str(tmp_path / "a"), 40, 10, 16, image_size=32, seed=7)
    b = write_shapes_dataset(str(tmp_path / "b"), 40, 10, 16, image_size=32, seed=7)
    c = write_shapes_dataset(str(tmp_path / "c"), 40, 10, 16, image_size=32, seed=8)
    names = [os.path.basename(p) for p in a["train_shards"] + a["val_shards"]] + ["classes.json"]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar", "classes.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (tmp_path / "c" / "train-000000.tar").read_bytes()
    assert not list(tmp_path.glob("*/*.tmp"))


def test_synthetic_content_matches_captions(data: dict) -> None:
    assert expand_shards(data["train_spec"]) == data["train_shards"] and len(data["train_shards"]) == 6
    info = json.load(open(data["classes_json"]))
    assert len(info["shapes"]) >= 3 and len(info["colours"]) >= 6 and len(info["backgrounds"]) >= 3
    assert not set(info["backgrounds"]) & set(info["colours"]) and info["version"] == 3  # neutral backgrounds
    assert len(info["classes"]) == len(SHAPES) * len(FOREGROUNDS)
    samples = [s for shard in data["train_shards"] + data["val_shards"] for s in iter_samples(shard)]
    assert len(samples) == NUM_TRAIN + NUM_VAL
    assert len({s["__key__"] for s in samples}) == len(samples)
    seen, named_background = set(), 0
    for s in samples:
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        assert f"{meta['colour']} {meta['shape']}" in caption
        # Half the templates name the background (it is the only other colour word), half do not.
        named_background += meta["background"] in caption
        assert not set(caption.split()) & (set(COLOURS) - {meta["colour"], meta["background"]})
        assert meta["colour"] != meta["background"]
        assert len(meta["paraphrases"]) >= 2 and len(meta["negatives"]) >= 2 and caption not in meta["negatives"]
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(float)
        assert img.shape == (SIZE, SIZE, 3)
        assert meta["center"] == [SIZE / 2, SIZE / 2]  # version 3: centred (only the size varies)
        cx, cy = (int(round(v)) for v in meta["center"])
        assert nearest_colour(img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)) == meta["colour"]
        assert nearest_colour(img[:2, :2].reshape(-1, 3).mean(0)) == meta["background"]  # corners are background
        seen.add((meta["shape"], meta["colour"], meta["background"]))
        if s["__key__"].startswith("val"):
            cls = info["classes"][info["val_labels"][s["__key__"]]]
            assert (cls["shape"], cls["colour"]) == (meta["shape"], meta["colour"])
            assert any(p in caption for p in cls["prompts"][:1])
    assert len(info["val_labels"]) == NUM_VAL
    assert len({x[0] for x in seen}) >= 3 and len({x[1] for x in seen}) >= 4
    assert 0.25 * len(samples) < named_background < 0.75 * len(samples)


# --------------------------------------------------------------------------- shards


def test_expand_shards_forms(data: dict, tmp_path) -> None:
    d = data["out_dir"]
    train = data["train_shards"]
    assert expand_shards(os.path.join(d, "train-{000002..000004}.tar")) == train[2:5]
    assert os.path.basename(expand_shards(os.path.join(d, "train-{000000..000000}.tar"))[0]) == "train-000000.tar"
    assert expand_shards(os.path.join(d, "train-*.tar")) == train
    assert expand_shards(d) == train + data["val_shards"]  # directory: every *.tar, sorted
    assert expand_shards(f"{train[1]},{train[0]}, {data['val_spec']}") == [train[1], train[0]] + data["val_shards"]

    spec = os.path.join(d, "train-{000004..000009}.tar")
    with pytest.raises(FileNotFoundError) as e:
        expand_shards(spec)
    assert spec in str(e.value) and "train-000006.tar" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        expand_shards(f"{train[0]},{d}/nope.tar")
    with pytest.raises(FileNotFoundError, match="matched no files"):
        expand_shards(os.path.join(d, "test-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        expand_shards(str(tmp_path / "empty"))


def _sample(i: int) -> dict:
    return {"__key__": f"s{i:03d}", "jpg": bytes([i % 256]) * 600, "txt": f"caption {i}", "json": {"i": i}}


def test_shard_writer_roundtrip_and_grouping(tmp_path) -> None:
    with ShardWriter(str(tmp_path / "x-%04d.tar"), max_samples_per_shard=4) as w:
        for i in range(10):
            w.write(_sample(i))
        w.write({"__key__": "dir/k", "jpg": b"j", "pos.jpg": b"p", "neg.jpg": b"n"})
    assert [os.path.basename(p) for p in w.shards] == ["x-0000.tar", "x-0001.tar", "x-0002.tar"]
    samples = [s for p in w.shards for s in iter_samples(p)]
    assert [s["__key__"] for s in samples] == [f"s{i:03d}" for i in range(10)] + ["dir/k"]
    assert samples[5]["txt"] == b"caption 5" and json.loads(samples[5]["json"]) == {"i": 5}
    assert samples[5]["__shard__"] == w.shards[1] and "__partial__" not in samples[5]
    assert {k for k in samples[-1] if not k.startswith("__")} == {"jpg", "pos.jpg", "neg.jpg"}
    with pytest.raises(ValueError, match="duplicate key"):
        with ShardWriter(str(tmp_path / "d-%04d.tar"), 10) as w2:
            w2.write(_sample(1))
            w2.write(_sample(1))


def test_shard_writer_is_atomic(tmp_path) -> None:
    pattern = str(tmp_path / "a-%02d.tar")
    w = ShardWriter(pattern, max_samples_per_shard=3)
    for i in range(4):
        w.write(_sample(i))
    assert os.path.exists(pattern % 0)  # a full shard is finished and renamed
    assert not os.path.exists(pattern % 1) and os.path.exists(pattern % 1 + ".tmp")  # in progress
    w.close()
    assert os.path.exists(pattern % 1) and not os.path.exists(pattern % 1 + ".tmp")

    pattern = str(tmp_path / "b-%02d.tar")
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(pattern, max_samples_per_shard=100) as w:
            for i in range(5):
                w.write(_sample(i))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("b-")) == []


def _truncate_inside(shard: str, member_name: str, dest: str, into: int = 10) -> None:
    """Copy ``shard`` to ``dest`` cut ``into`` bytes into the data of ``member_name``."""
    with tarfile.open(shard) as tf:
        offset = tf.getmember(member_name).offset_data
    with open(shard, "rb") as f:
        data = f.read()
    with open(dest, "wb") as f:
        f.write(data[: offset + into])


def test_truncated_shard_keeps_good_samples_then_raises(tmp_path) -> None:
    with ShardWriter(str(tmp_path / "t-%02d.tar"), 100) as w:
        for i in range(8):
            w.write(_sample(i))
    shard = w.shards[0]
    with tarfile.open(shard) as tf:
        header_of_s005 = tf.getmember("s005.jpg").offset
    cases = {
        "s005.jpg": ["s000", "s001", "s002", "s003", "s004"],  # damage inside the first file of s005
        "s005.txt": ["s000", "s001", "s002", "s003", "s004", "s005*"],  # s005 partial (jpg only)
    }
    for member, expected in cases.items():
        cut = str(tmp_path / f"cut-{member}.tar")
        _truncate_inside(shard, member, cut)
        got: list[str] = []
        with pytest.raises(ShardReadError) as e:
            for s in iter_samples(cut):
                got.append(s["__key__"] + ("*" if s.get("__partial__") else ""))
        assert got == expected
        assert cut in str(e.value) and e.value.shard == cut
    # A cut exactly between samples (tarfile alone would call that a clean end).
    cut = str(tmp_path / "cut-boundary.tar")
    with open(shard, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[:header_of_s005])
    got = []
    with pytest.raises(ShardReadError, match="end-of-archive"):
        for s in iter_samples(cut):
            got.append(s["__key__"])
    assert got == ["s000", "s001", "s002", "s003", "s004"]
    with pytest.raises(ShardReadError, match="cannot open"):
        list(iter_samples(str(tmp_path / "missing.tar")))


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer(tok: Tokenizer, data: dict, tmp_path) -> None:
    assert (tok.pad_id, tok.eos_id) == (0, 1) and 3 < tok.vocab_size <= 1024
    captions = ["a red circle on a blue background", "A photo of a GREEN star on gray"]
    x = tok.encode(captions)
    assert x.shape == (2, 16) and x.dtype == torch.int64
    for row in x:
        n = int((row != tok.pad_id).sum())
        assert row[n - 1] == tok.eos_id and (row[:n - 1] != tok.eos_id).all()
        assert (row[n:] == tok.pad_id).all() and n < 16
    assert torch.equal(tok.encode("a green star")[0], tok.encode("A GREEN STAR")[0])  # lower-cased
    assert tok.decode(x) == [c.lower() for c in captions]
    long = tok.encode(["a red circle " * 20])
    assert long.shape == (1, 16) and long[0, -1] == tok.eos_id and (long[0] != tok.pad_id).all()

    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer(missing)
    assert missing in str(e.value) and "tulip-mega tokenizer train --data SHARDS --out PREFIX" in str(e.value)


# --------------------------------------------------------------------------- loader


def test_loader_batches(data: dict, tok: Tokenizer) -> None:
    loader = SimpleLoader(data["train_shards"], batch_size=8, image_size=32, tokenizer=tok, seed=1)
    assert isinstance(loader, BatchLoader)
    batches = list(itertools.islice(loader, 3))
    b = batches[0]
    assert isinstance(b, Batch) and len(b.keys) == 8
    assert b.images.shape == (8, 3, 32, 32) and b.images.dtype == torch.float32
    assert b.tokens.shape == (8, 16) and b.tokens.dtype == torch.int64
    assert -1.0 <= float(b.images.min()) < -0.5 and 0.5 < float(b.images.max()) <= 1.0
    assert loader.stats() == {"samples": 24, "skipped": 0}

    again = list(itertools.islice(SimpleLoader(data["train_shards"], 8, 32, tok, seed=1), 3))
    for x, y in zip(batches, again):
        assert x.keys == y.keys and torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)
    other = next(iter(SimpleLoader(data["train_shards"], 8, 32, tok, seed=2)))
    assert other.keys != b.keys


@pytest.mark.parametrize(
    "num_shards,dp_size,batch",
    [(6, 2, 8), (6, 4, 5), (1, 4, 4)],  # even / uneven shards per rank, fewer shards than ranks
)
def test_loader_dp_ranks_disjoint_and_complete(data: dict, tok: Tokenizer, num_shards, dp_size, batch) -> None:
    """Each rank's own round (here: the epoch) is its equal share, and the shares cover the data;
    tests/integration/test_dp_split.py draws the ranks in lockstep."""
    shards = data["train_shards"][:num_shards]
    everything = all_keys(shards)
    per_rank = []
    for rank in range(dp_size):
        loader = SimpleLoader(shards, batch, 32, tok, dp_rank=rank, dp_size=dp_size, seed=5, shuffle_buffer=8)
        n = sum(s.stop - s.start for s in loader.stream.epoch_slices(0))
        assert n == len(everything) // dp_size
        keys = take_keys(loader, n)
        assert len(set(keys)) == n  # one round: no repeats
        per_rank.append(set(keys))
    assert sum(len(k) for k in per_rank) == len(everything)
    assert set().union(*per_rank) == set(everything)


def test_loader_exact_resume_across_epochs(data: dict, tok: Tokenizer) -> None:
    shards = data["train_shards"][:3]  # 48 samples, batch 10: epochs end mid-batch
    kw = dict(batch_size=10, image_size=32, tokenizer=tok, dp_rank=1, dp_size=2, seed=4, shuffle_buffer=6)
    reference = list(itertools.islice(SimpleLoader(shards, **kw), 12))  # rank 1 reads 1 shard = 16 per epoch
    for stop in (1, 2, 4):
        first = SimpleLoader(shards, **kw)
        list(itertools.islice(first, stop))
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store plain JSON
        resumed = SimpleLoader(shards, **kw)
        resumed.load_state_dict(state)
        for want, got in zip(reference[stop:], itertools.islice(resumed, 6)):
            assert got.keys == want.keys
            assert torch.equal(got.images, want.images) and torch.equal(got.tokens, want.tokens)
        assert resumed.state_dict()["epoch"] >= 1
    # Resuming twice in a row from the same object continues, too.
    it_loader = SimpleLoader(shards, **kw)
    got = list(itertools.islice(it_loader, 3)) + list(itertools.islice(it_loader, 3))
    assert [b.keys for b in got] == [b.keys for b in reference[:6]]

    with pytest.raises(ValueError, match="dp_size=2.*dp_size=4"):
        SimpleLoader(shards, **{**kw, "dp_size": 4}).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        SimpleLoader(shards, **{**kw, "seed": 9}).load_state_dict(state)


def _plant_bad_shards(data: dict, tmp_path) -> tuple[list[str], set[str], list[str]]:
    """Three shards: one with 3 bad samples, one intact, one truncated.

    Returns the shards, the keys of all good samples, and the keys of the 3 bad samples.
    """
    src = [s for shard in data["train_shards"][:2] for s in iter_samples(shard)]
    good: set[str] = set()
    with ShardWriter(str(tmp_path / "bad-%06d.tar"), 100) as w:
        for i, s in enumerate(src[:12]):
            sample = dict(s)
            if i == 3:
                sample["jpg"] = s["jpg"][: len(s["jpg"]) // 2]  # corrupt (truncated) JPEG
            elif i == 6:
                del sample["txt"]  # missing caption
            elif i == 8:
                sample["txt"] = b"a red \xff\xfe circle"  # not UTF-8
            else:
                good.add(s["__key__"])
            w.write(sample)  # "__shard__" and other "__" fields are not written
        w.close()  # next write starts shard 1
        for s in src[12:20]:
            w.write(s)
            good.add(s["__key__"])
        w.close()
        for s in src[20:30]:
            w.write(s)
    shards = w.shards
    # Truncate the third shard inside the image of its 8th sample: 7 good samples survive.
    _truncate_inside(shards[2], f"{src[27]['__key__']}.jpg", shards[2] + ".cut", into=100)
    os.replace(shards[2] + ".cut", shards[2])
    good.update(s["__key__"] for s in src[20:27])
    return shards, good, [src[i]["__key__"] for i in (3, 6, 8)]


def test_loader_skips_and_counts_bad_data(data: dict, tok: Tokenizer, tmp_path, caplog) -> None:
    shards, good, bad_keys = _plant_bad_shards(data, tmp_path)
    num_bad = len(bad_keys) + 1  # + the truncated shard (counted once, wherever the cut falls)
    caplog.set_level(logging.WARNING, logger="tulip_mega.data.simple_loader")
    loader = SimpleLoader(shards, batch_size=4, image_size=32, tokenizer=tok, seed=0, num_epochs=1)
    keys = [k for batch in loader for k in batch.keys]
    assert len(keys) == len(set(keys)) == len(good) == 7 + 8 + 9
    assert set(keys) == good
    assert loader.stats() == {"samples": len(good), "skipped": num_bad}
    log = caplog.text
    assert shards[0] in log and shards[2] in log and "UTF-8" in log and "caption" in log and "image" in log
    assert all(repr(k) in log for k in bad_keys)

    # Same totals when two dp ranks split the data (shard level), and the loader keeps going.
    for dp_size, n_shards in ((2, 3), (2, 1)):
        stats = [
            SimpleLoader(shards[:n_shards], 4, 32, tok, dp_rank=r, dp_size=dp_size, num_epochs=1) for r in range(2)
        ]
        for ld in stats:
            list(ld)
        assert sum(ld.stats()["skipped"] for ld in stats) == (num_bad if n_shards == 3 else 3)
    # Infinite loader over bad data: keeps going, and resuming reproduces batches and counters.
    infinite = SimpleLoader(shards, 4, 32, tok)
    reference = [b.keys for b in itertools.islice(infinite, 15)]  # 60 samples: 2.5 epochs
    assert infinite.stats()["samples"] == 60 and 2 * num_bad <= infinite.stats()["skipped"] <= 3 * num_bad
    first = SimpleLoader(shards, 4, 32, tok)
    part = [b.keys for b in itertools.islice(first, 7)]
    second = SimpleLoader(shards, 4, 32, tok)
    second.load_state_dict(first.state_dict())
    part += [b.keys for b in itertools.islice(second, 8)]
    assert part == reference and second.state_dict() == infinite.state_dict()


def test_the_trainer_maps_the_recipe_onto_the_loaders_own_config() -> None:
    """EdaConfig's defaults are the recipe's; view_plan copies the recipe's crop and colour settings."""
    from tulip_mega.config import load_config
    from tulip_mega.config.schema import AugmentConfig
    from tulip_mega.data.eda import EdaConfig
    from tulip_mega.launch import resolve_layout
    from tulip_mega.training.data import eda_config, view_plan

    assert eda_config(AugmentConfig()) == EdaConfig()
    cfg = load_config(None, ["data.augment.eda_swap=0.25", "data.views.local_size=64"])
    plan = view_plan(cfg, resolve_layout(cfg, 1).streams)
    assert plan.eda_config == EdaConfig(swap=0.25) and plan.local_size == 64
    assert plan.image_size == cfg.model.vision.image_size and plan.fields() == ("images", "tokens", "keys")
