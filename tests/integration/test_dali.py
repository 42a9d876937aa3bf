"""The DALI loader (tulip_mega/data/dali_loader.py) on the synthetic shapes set, CPU decode.

References are computed independently in the tests: PIL decodes for view 0, the shards read
with shards.iter_samples for key sets and json texts, planted corruption counted by hand.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from tulip_mega.data.dali_loader import DaliLoader  # noqa: E402
from tulip_mega.data.dali_pipeline import ViewPlan, rrc_window  # noqa: E402
from tulip_mega.data.eda import EdaConfig, eda  # noqa: E402
from tulip_mega.data.eda_words import STOP_WORDS, SYNONYMS  # noqa: E402
from tulip_mega.data.shards import ShardReadError, ShardWriter, expand_shards, iter_samples  # noqa: E402
from tulip_mega.data.simple_loader import SimpleLoader  # noqa: E402
from tulip_mega.data.tokenizer import Tokenizer  # noqa: E402

CTX = 24
FULL = ViewPlan(image_size=32, crops=1, local_crops=2, local_size=16, edits=True, paraphrases=2, negatives=4, eda=True)


@pytest.fixture(scope="module")
def tok(shapes_data) -> Tokenizer:
    return Tokenizer(shapes_data["tokenizer"], CTX)


@pytest.fixture(scope="module")
def two_shards(shapes_data) -> list[str]:
    return expand_shards(shapes_data["train"])[:2]  # 256 samples of 32 px


def samples_by_key(shards: list[str]) -> dict[str, dict]:
    return {s["__key__"]: s for shard in shards for s in iter_samples(shard)}


def loader(shards, tok, plan=FULL, batch=16, **kw) -> DaliLoader:
    kw.setdefault("threads", 2)
    kw.setdefault("shuffle_buffer", 64)
    return DaliLoader(shards, batch, plan, tok, gpu=False, **kw)


def test_views_shapes_dtypes_ranges_and_content(two_shards, tok) -> None:
    batch = next(iter(loader(two_shards, tok, seed=3)))
    B = 16
    expected = {
        "images": ((B, 3, 32, 32), torch.float32), "tokens": ((B, CTX), torch.int64),
        "crops": ((B, 1, 3, 32, 32), torch.float32), "local_crops": ((B, 2, 3, 16, 16), torch.float32),
        "edits": ((B, 2, 3, 32, 32), torch.float32), "edit_valid": ((B, 2), torch.bool),
        "paraphrases": ((B, 2, CTX), torch.int64), "paraphrase_valid": ((B, 2), torch.bool),
        "negatives": ((B, 4, CTX), torch.int64), "negative_valid": ((B, 4), torch.bool),
        "eda_tokens": ((B, CTX), torch.int64),
    }
    got = {k: (tuple(v.shape), v.dtype) for k, v in batch.tensor_fields().items()}
    assert got == expected
    for name in ("images", "crops", "local_crops", "edits"):
        t = getattr(batch, name)
        assert t.min() >= -1.0 and t.max() <= 1.0 and t.std() > 0.1, name
    ref = samples_by_key(two_shards)
    for i, key in enumerate(batch.keys):
        s = ref[key]
        # view 0 = plain resize (32 -> 32: the decoded pixels), normalised to [-1, 1]
        pil = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float32) / 127.5 - 1
        assert np.abs(batch.images[i].permute(1, 2, 0).numpy() - pil).mean() < 0.03, key
        pos = np.asarray(Image.open(io.BytesIO(s["pos.jpg"])).convert("RGB"), dtype=np.float32) / 127.5 - 1
        assert np.abs(batch.edits[i, 0].permute(1, 2, 0).numpy() - pos).mean() < 0.03, key
        meta = json.loads(s["json"])
        assert tok.decode(batch.tokens[i]) == tok.decode(tok.encode(s["txt"].decode()))
        assert tok.decode(batch.paraphrases[i]) == tok.decode(tok.encode(meta["paraphrases"][:2]))
        # the synthetic json has 3 negatives: the 4th slot is padding with valid False
        assert batch.negative_valid[i].tolist() == [True, True, True, False]
        assert (batch.negatives[i, 3] == tok.pad_id).all()
        assert tok.decode(batch.negatives[i, :3]) == tok.decode(tok.encode(meta["negatives"]))
    assert batch.edit_valid.all() and batch.paraphrase_valid.all()
    assert not torch.equal(batch.crops[:, 0], batch.images)  # crops are augmented
    assert not torch.equal(batch.eda_tokens, batch.tokens)  # EDA changed some captions


def test_crop_flip_and_grayscale_semantics(two_shards, tok) -> None:
    """Full-area crops with flip p=1 are the mirrored view 0; grayscale p=1 equalises channels."""
    flip = ViewPlan(image_size=32, crops=1, global_scale=(1.0, 1.0), flip_prob=1.0, color_jitter_prob=0.0,
                    grayscale_prob=0.0, blur_prob=0.0)
    b = next(iter(loader(two_shards, tok, plan=flip)))
    # scale 1 forces torchvision's fallback (whole square image) unless the ratio draw is exactly 1
    assert torch.allclose(b.crops[:, 0], b.images.flip(-1), atol=1e-5)
    assert b.local_crops is None and b.edits is None and b.paraphrases is None and b.eda_tokens is None
    gray = ViewPlan(image_size=32, crops=1, flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
    c = next(iter(loader(two_shards, tok, plan=gray))).crops[:, 0]
    assert (c[:, 0] - c[:, 1]).abs().max() < 0.02 and (c[:, 1] - c[:, 2]).abs().max() < 0.02
    assert c.std() > 0.1


def test_rrc_window_matches_torchvision_rules() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        top, left, ch, cw = rrc_window(rng, w, h, (0.2, 0.6))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    top, left, ch, cw = rrc_window(rng, 10, 100, (1.0, 1.0))  # too tall: ratio clamped to 3/4
    assert (cw, ch) == (10, 13) and top == (100 - 13) // 2


def test_same_seed_same_batches_and_replicas_agree(two_shards, tok) -> None:
    """Same config (another TP rank or pipeline stage) -> identical batches; another seed differs."""
    a = [b for _, b in zip(range(3), loader(two_shards, tok, seed=5))]
    b = [b for _, b in zip(range(3), loader(two_shards, tok, seed=5, threads=1, prefetch=0))]
    c = next(iter(loader(two_shards, tok, seed=6)))
    for x, y in zip(a, b):
        assert x.keys == y.keys
        for name, t in x.tensor_fields().items():
            assert torch.equal(t, getattr(y, name)), name
    assert c.keys != a[0].keys


def test_dp_ranks_disjoint_and_cover(two_shards, tok) -> None:
    plan = ViewPlan(image_size=32)
    seen = []
    for rank in range(2):
        keys = [k for b in loader(two_shards, tok, plan=plan, batch=32, dp_rank=rank, dp_size=2, num_epochs=1)
                for k in b.keys]
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(samples_by_key(two_shards))
    # same order as the PIL loader (shared stream): a run may switch loaders and keep its position
    simple = SimpleLoader(two_shards, 32, 32, tok, dp_rank=1, dp_size=2, shuffle_buffer=64, num_epochs=1)
    assert [k for b in simple for k in b.keys] == seen[1]


def test_exact_resume_mid_epoch(two_shards, tok) -> None:
    plan = ViewPlan(image_size=32, crops=1, local_crops=1, local_size=16, eda=True)
    full = [b for _, b in zip(range(12), loader(two_shards, tok, plan=plan, seed=1))]  # crosses the epoch end
    first = loader(two_shards, tok, plan=plan, seed=1)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(two_shards, tok, plan=plan, seed=1)
    resumed.load_state_dict(state)
    rest = [b for _, b in zip(range(7), resumed)]
    for x, y in zip(full[5:], rest):
        assert x.keys == y.keys
        for name, t in x.tensor_fields().items():
            assert torch.equal(t, getattr(y, name)), name
    assert resumed.stats()["samples"] == 12 * 16


# --------------------------------------------------------------------------- bad data


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _plant(src: str, dst: str, edit) -> None:
    """Rewrite shard ``src`` to ``dst`` with ``edit(sample) -> sample or None`` applied."""
    with ShardWriter(dst.replace(".tar", ".%d.tar"), 10**6) as w:
        for s in iter_samples(src):
            s = edit(dict(s))
            if s is not None:
                w.write({k: v for k, v in s.items() if k not in ("__shard__",)})
    os.replace(dst.replace(".tar", ".0.tar"), dst)


def test_planted_corruption_is_skipped_counted_and_no_good_sample_lost(two_shards, tok, tmp_path, caplog) -> None:
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    jpg = _jpeg_bytes()
    planted = {  # key -> what is wrong (each is one counted skip)
        "train0000003": "truncated jpeg (header fine, DALI decode fails)",
        "train0000010": "garbage instead of a jpeg",
        "train0000020": "missing caption",
        "train0000030": "malformed json",
        "train0000040": "corrupt neg.jpg edit",
    }

    def edit(s):
        k = s["__key__"]
        if k == "train0000003":
            s["jpg"] = jpg[: len(jpg) // 2]
        elif k == "train0000010":
            s["jpg"] = b"not a jpeg at all" * 10
        elif k == "train0000020":
            del s["txt"]
        elif k == "train0000030":
            s["json"] = b'{"paraphrases": ["x", '
        elif k == "train0000040":
            s["neg.jpg"] = jpg[: len(jpg) // 3]
        elif k == "train0000050":
            del s["pos.jpg"]  # a missing edit is NOT bad data: zeros + edit_valid False
        return s

    _plant(two_shards[0], a, edit)
    shutil.copy(two_shards[1], b)
    size = os.path.getsize(b)
    with open(b, "r+b") as f:  # cut the second shard in the middle of a member
        f.truncate(size // 2 + 700)
    expected_b = []
    try:
        for s in iter_samples(b):
            # The sample the cut fell in is kept when it still has what the loader needs, image
            # and caption (shards.iter_samples); json and the GeCo edits are optional, so an edit
            # lost to the cut is a missing edit (edit_valid False), as in a sample without one.
            if not s.get("__partial__") or {"jpg", "txt"} <= set(s):
                expected_b.append(s["__key__"])
    except ShardReadError:
        pass
    good = sorted(set(samples_by_key([two_shards[0]])) - set(planted)) + expected_b

    caplog.set_level(logging.WARNING)
    dl = loader([a, b], tok, batch=16, num_epochs=1)
    batches = list(dl)
    keys = [k for x in batches for k in x.keys]
    assert sorted(keys) == sorted(good)  # nothing bad got through, no good sample lost
    assert dl.stats()["skipped"] == len(planted) + 1  # + the truncated shard, counted once
    assert dl.stats()["samples"] == len(good)
    for key in planted:
        assert any(key in r.getMessage() and a in r.getMessage() for r in caplog.records), key
    assert any("truncated" in r.getMessage() and b in r.getMessage() for r in caplog.records)
    x = next(x for x in batches if "train0000050" in x.keys)
    i = x.keys.index("train0000050")
    assert x.edit_valid[i].tolist() == [False, True] and (x.edits[i, 0] == 0).all() and x.edits[i, 1].std() > 0.1
    assert len(set(keys)) == len(keys)


# --------------------------------------------------------------------------- EDA


def test_eda_operations() -> None:
    text = "a photo of a red circle on a blue background"
    assert eda(text, random.Random(0), EdaConfig(0, 0, 0, 0)) == text
    stop = eda(text, random.Random(0), EdaConfig(0, 0, 0, 1))
    assert stop.split() == [w for w in text.split() if w not in STOP_WORDS]
    syn = eda(text, random.Random(1), EdaConfig(1, 0, 0, 0)).split()
    changed = [(o, n) for o, n in zip(text.split(), syn) if o != n]
    assert len(changed) >= 1 and all(n in " ".join(SYNONYMS[o]).split() for o, n in changed)
    swap = eda(text, random.Random(2), EdaConfig(0, 1, 0, 0))
    assert sorted(swap.split()) == sorted(text.split())
    assert eda("the", random.Random(0), EdaConfig(0, 0, 1, 1)) == "the"  # never empty
    outs = {eda(text, random.Random(s)) for s in range(20)}
    assert len(outs) > 5 and eda(text, random.Random(7)) == eda(text, random.Random(7))
    for word, syns in SYNONYMS.items():  # symmetric sets: replacement never drifts
        for s in syns:
            assert " " in s or word in SYNONYMS[s], (word, s)


# --------------------------------------------------------------------------- index files


def test_index_files_drive_dalis_webdataset_reader_past_damage(two_shards, tmp_path) -> None:
    """Our index of a truncated shard lets fn.readers.webdataset read exactly the intact samples."""
    from nvidia.dali import fn, pipeline_def

    from tulip_mega.data.dali_index import build_index, ensure_indexes

    cut = str(tmp_path / "cut.tar")
    shutil.copy(two_shards[0], cut)
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) * 2 // 3)
    intact = []
    try:
        for s in iter_samples(cut):
            if not s.get("__partial__"):
                intact.append(s["__key__"])
    except ShardReadError:
        pass
    result = build_index(cut, str(tmp_path / "idx"))
    assert result.samples == len(intact) and 0 < len(intact) < 128 and "truncated" in result.damage
    assert ensure_indexes([cut], str(tmp_path / "idx")) == [result.index]

    @pipeline_def(batch_size=len(intact), num_threads=1, device_id=None)
    def read():
        jpg, txt = fn.readers.webdataset(paths=[cut], index_paths=[result.index], ext=["jpg", "txt"])
        return jpg, txt

    pipe = read()
    pipe.build()
    jpgs, txts = pipe.run()
    ref = samples_by_key([two_shards[0]])
    got = [bytes(txts.at(i)).decode() for i in range(len(intact))]
    assert got == [ref[k]["txt"].decode() for k in intact]
    assert bytes(jpgs.at(0)) == ref[intact[0]]["jpg"]


# --------------------------------------------------------------------------- recipe -> loader


def _cfg(shapes_data, *overrides: str):
    from tulip_mega.config import load_config

    return load_config(None, [
        f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
        "model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
        "train.micro_batch_size=4", "train.global_batch_size=8", "data.shuffle_buffer=16", *overrides,
    ])


RECIPES = {
    "siglip": [],
    "tulip": ["loss.weights.image_image=1", "loss.weights.text_text=1", "data.views.global_crops=2",
              "data.views.local_crops=2", "data.views.local_size=16", "data.views.geco_images=true",
              "data.views.paraphrases=2", "data.views.negatives=3"],
    "clip_rocket": ["loss.contrastive=infonce", "loss.weights.aug_contrastive=1", "data.views.global_crops=2",
                    "data.views.eda=true", "data.augment.first_view_crop=true"],
    "views_but_weight_zero": ["data.views.global_crops=3", "data.views.local_crops=4", "data.views.eda=true"],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_build_train_loader_emits_exactly_the_recipes_streams(shapes_data, name) -> None:
    from tulip_mega.config.streams import input_streams
    from tulip_mega.launch import resolve_layout
    from tulip_mega.training.data import build_train_loader

    cfg = _cfg(shapes_data, *RECIPES[name])
    s = input_streams(cfg)
    loader = build_train_loader(cfg, resolve_layout(cfg, 1), dp_rank=0)
    assert isinstance(loader, DaliLoader)
    batch = next(iter(loader))
    B, L, S = 4, cfg.model.text.context_length, 32
    want = {"images": (B, 3, S, S), "tokens": (B, L)}
    if s.extra_global_crops:
        want["crops"] = (B, s.extra_global_crops, 3, S, S)
    if s.local_crops:
        want["local_crops"] = (B, s.local_crops, 3, s.local_size, s.local_size)
    if s.geco_edits:
        want.update(edits=(B, 2, 3, S, S), edit_valid=(B, 2))
    if s.paraphrases:
        want.update(paraphrases=(B, s.paraphrases, L), paraphrase_valid=(B, s.paraphrases))
    if s.negatives:
        want.update(negatives=(B, s.negatives, L), negative_valid=(B, s.negatives))
    if s.eda_caption:
        want["eda_tokens"] = (B, L)
    assert {k: tuple(v.shape) for k, v in batch.tensor_fields().items()} == want
    if name == "views_but_weight_zero":
        assert set(want) == {"images", "tokens"}  # views nobody consumes are not built


def test_simple_loader_refuses_fields_it_cannot_make(shapes_data) -> None:
    from tulip_mega.config import ConfigError
    from tulip_mega.launch import resolve_layout
    from tulip_mega.training.data import build_train_loader

    cfg = _cfg(shapes_data, "data.loader=simple", *RECIPES["tulip"])
    with pytest.raises(ConfigError, match=r"data\.loader=simple.*'crops'"):
        build_train_loader(cfg, resolve_layout(cfg, 1), 0)
    simple = _cfg(shapes_data, "data.loader=simple")
    plain = build_train_loader(simple, resolve_layout(simple, 1), 0)
    assert isinstance(plain, SimpleLoader) and not isinstance(plain, DaliLoader)


# --------------------------------------------------------------------------- CLI


def test_data_cli_index_stats_inspect(shapes_data, two_shards, tmp_path, capsys) -> None:
    from tulip_mega.cli import main

    assert main(["data", "index", "--data", two_shards[0], "--index-dir", str(tmp_path / "idx")]) == 0
    lines = (tmp_path / "idx" / (os.path.basename(two_shards[0]) + ".idx")).read_text().splitlines()
    assert lines[0] == "v1.2 128" and len(lines) == 129
    capsys.readouterr()
    assert main(["data", "stats", "--data", two_shards[0]]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 128 and stats["fields"]["pos.jpg"] == 128 and not stats["problems"]
    png = tmp_path / "grid.png"
    args = ["data", "inspect", "--data", shapes_data["train"], "--tokenizer", shapes_data["tokenizer"],
            "--out", str(png), "--rows", "3", "model.size=debug", "model.vision.image_size=32",
            "model.vision.patch_size=8", *RECIPES["tulip"]]
    assert main(args) == 0
    with Image.open(png) as im:
        # 3 rows; columns: view 0 + 1 crop + 2 local + 2 edits = 6 tiles of 32 px (+2 px gaps)
        assert im.size == (6 * 34 + 2, 3 * (32 + 14 + 2) + 2)


# --------------------------------------------------------------------------- through the trainer


def _train_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train

    return train(load_config(None, overrides))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_training_on_planted_corruption_finishes_and_reports_skips(shapes_data, two_shards, tmp_path) -> None:
    """The real trainer (DALI loader, one gloo rank) runs through bad samples to the last step,
    and data/skipped in its metrics is exactly the number of bad samples it passed."""
    from tulip_mega.parallel.spawn import run_distributed

    jpg = _jpeg_bytes()
    bad = {"train0000005": lambda s: s.update(jpg=jpg[: len(jpg) // 2]),  # DALI decode failure
           "train0000030": lambda s: s.pop("txt"),
           "train0000061": lambda s: s.update(jpg=b"garbage" * 9),
           "train0000090": lambda s: s.update(txt=b"\xff\xfe not utf-8")}

    def edit(s):
        if s["__key__"] in bad:
            bad[s["__key__"]](s)
        return s

    shard = str(tmp_path / "bad.tar")
    _plant(two_shards[0], shard, edit)
    # no shuffle, one shard: 3 steps x 32 samples = the first 96 good samples = keys 0..99,
    # passing all 4 bad ones and stopping before the end of the epoch (so none is seen twice)
    out = run_distributed(_train_worker, 1, [
        f"data.train_shards={shard}", f"data.tokenizer={shapes_data['tokenizer']}", "data.loader=dali",
        "data.shuffle_buffer=0", "model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
        "train.steps=3", "train.global_batch_size=32", "train.micro_batch_size=16", "optim.warmup_steps=0",
        f"run.output_dir={tmp_path}", "run.name=bad", "logging.tensorboard=false", "run.log_interval=3",
        "data.reader_workers=2",  # worker processes under the real trainer (gloo, torch threads)
    ])[0]
    assert out["finished"] and out["step"] == 3
    assert out["metrics"]["data/skipped"] == len(bad)
    assert out["metrics"]["data/samples"] == 96
    assert 0 <= out["metrics"]["data_wait_fraction"] and "loader_wait_fraction" in out


# --------------------------------------------------------------------------- reader workers


def _same(xs, ys) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys == y.keys
        assert x.tensor_fields().keys() == y.tensor_fields().keys()
        for name, t in x.tensor_fields().items():
            assert torch.equal(t, getattr(y, name)), name


def test_reader_worker_messages_end_at_the_sample_or_byte_bound(two_shards, tok, tmp_path) -> None:
    """A worker's messages (``reader_pool._read``) hold READ_CHUNK samples from a plain tar
    (records carry offsets, not image bytes); from a compressed tar, whose samples carry their
    bytes, a message ends once it holds max_chunk_bytes, so the queue bound stays a memory
    bound. Either way the records, in order, are those of one big message."""
    import gzip
    import shutil

    from tulip_mega.data.host_prep import HostPrep
    from tulip_mega.data.reader_pool import _read, _unpack

    class Sink(list):
        def put(self, msg, timeout=None):
            self.append(msg)

    def messages(shard: str, chunk: int, max_bytes: int) -> list[list]:
        sink = Sink()
        assert _read(HostPrep(FULL, tok, 0, 0), shard, chunk, sink, os.getpid(), max_bytes)
        assert sink[-1] == ("end", None)
        return [_unpack(payload) for kind, payload in sink[:-1] if kind == "items"]

    def keys(msgs: list[list]) -> list[str]:
        return [r["__key__"] for m in msgs for r in m]

    plain = two_shards[0]  # 128 samples
    assert [len(m) for m in messages(plain, 1024, 1)] == [128]  # offsets: no bytes, the byte bound never ends one
    assert [len(m) for m in messages(plain, 50, 1 << 30)] == [50, 50, 28]
    packed = str(tmp_path / "shard.tar.gz")
    with open(plain, "rb") as f, gzip.open(packed, "wb") as g:
        shutil.copyfileobj(f, g)
    per_sample = sum(len(v) for v in next(iter_samples(packed)).values() if isinstance(v, bytes))
    bounded = messages(packed, 1024, 10 * per_sample)
    assert len(bounded) > 5 and all(len(m) <= 12 for m in bounded), [len(m) for m in bounded]
    whole = messages(packed, 1024, 1 << 30)
    assert len(whole) == 1 and keys(bounded) == keys(whole) == keys(messages(plain, 1024, 1))
    assert all("jpg" in r for m in bounded for r in m)  # the bytes travel (no offsets to read them back)


def test_reader_workers_give_identical_batches_across_epochs_and_resume(two_shards, tok) -> None:
    """0 (in the loader thread), 1, 2 and 3 worker processes: the same keys and bit-identical
    tensors batch by batch over the epoch boundary (7 x 48 > 256 samples); a state saved under
    2 workers resumes under 3 (and 0) with the very batches of the uninterrupted run."""
    def make(workers: int) -> DaliLoader:  # chunks of 16 entries: every worker holds several
        return loader(two_shards, tok, batch=48, seed=7, reader_workers=workers, chunk_size=16, read_chunk_size=16)

    ref = [b for _, b in zip(range(7), make(0))]
    for workers in (1, 2, 3):
        _same(ref, [b for _, b in zip(range(7), make(workers))])
    # fewer shards than DP ranks: each rank reads its range of samples, slices of shards
    few = [loader(two_shards, tok, batch=16, seed=7, dp_rank=1, dp_size=3, reader_workers=w) for w in (0, 2)]
    _same(*[[b for _, b in zip(range(3), dl)] for dl in few])
    first = make(2)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    for workers in (3, 0):
        resumed = make(workers)
        resumed.load_state_dict(state)
        _same(ref[3:], [b for _, b in zip(range(4), resumed)])
        assert resumed.stats()["samples"] == 7 * 48


def test_bad_data_skipped_and_counted_alike_with_any_worker_count(two_shards, tok, tmp_path) -> None:
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    jpg = _jpeg_bytes()
    bad = {"train0000004": ("jpg", jpg[: len(jpg) // 2]),  # truncated JPEG: fails in DALI
           "train0000011": ("txt", b"caf\xe9 \xff bad utf-8"),
           "train0000023": ("json", b'{"negatives": ["x", '),
           "train0000031": ("jpg", b"garbage" * 20)}

    def edit(s):
        if s["__key__"] in bad:
            field, value = bad[s["__key__"]]
            s[field] = value
        return s

    _plant(two_shards[0], a, edit)
    shutil.copy(two_shards[1], b)
    with open(b, "r+b") as f:  # a cut shard
        f.truncate(os.path.getsize(b) // 3)
    runs = {}
    for workers in (0, 2, 3):
        dl = loader([a, b], tok, batch=16, num_epochs=1, reader_workers=workers, chunk_size=8, read_chunk_size=8)
        runs[workers] = (list(dl), dl.stats())
    ref_batches, ref_stats = runs[0]
    keys = [k for x in ref_batches for k in x.keys]
    assert not set(bad) & set(keys) and ref_stats["skipped"] == len(bad) + 1  # + the cut shard
    for workers in (2, 3):
        batches, stats = runs[workers]
        _same(ref_batches, batches)
        assert (stats["samples"], stats["skipped"]) == (ref_stats["samples"], ref_stats["skipped"])


class _DyingPrep:
    """Wraps a HostPrep; its reader worker exits (code 3) or raises on reaching one key."""

    def __init__(self, prep, key: str, how: str) -> None:
        self.prep, self.key, self.how = prep, key, how

    def record(self, items):
        if any(item["__key__"] == self.key for item in items):
            if self.how == "exit":
                os._exit(3)
            raise ValueError(f"planted failure at {self.key}")
        return self.prep.record(items)

    def draw(self, requests):
        if self.how == "draw" and any(index == 40 for _, index, *_ in requests):
            raise ValueError("planted failure in draw")
        return self.prep.draw(requests)

    def __getattr__(self, name):  # everything else: the real HostPrep
        if name == "prep":
            raise AttributeError(name)
        return getattr(self.prep, name)


class _DyingLoader(DaliLoader):
    def _host_prep(self):
        return _DyingPrep(super()._host_prep(), "train0000040", self.how)


@pytest.mark.parametrize("how", ["exit", "raise", "draw"])
def test_a_dying_reader_worker_is_a_clear_error_naming_the_shard(two_shards, tok, how) -> None:
    from tulip_mega.data.reader_pool import ReaderWorkerError

    dl = _DyingLoader(two_shards, 16, FULL, tok, gpu=False, shuffle_buffer=0, reader_workers=2, chunk_size=8,
                      read_chunk_size=8)
    dl.how = how
    with pytest.raises(ReaderWorkerError) as err:
        list(zip(range(20), dl))
    message = str(err.value)
    # the shard holding key train0000040 (exit, raise) or position 40 of epoch 0 (draw; no shuffle)
    assert (dl.stream.epoch_shards(0)[0] if how == "draw" else two_shards[0]) in message
    expected = {"exit": "exit code 3", "raise": "planted failure at train0000040",
                "draw": "drawing view parameters"}[how]
    assert expected in message


def test_offsets_point_at_the_files_bytes(two_shards) -> None:
    """Reader workers send offsets instead of image bytes; reading there gives the same bytes."""
    with open(two_shards[0], "rb") as f:
        for s in iter_samples(two_shards[0], offsets=True):
            for ext, (offset, size) in s["__offsets__"].items():
                f.seek(offset)
                assert f.read(size) == s[ext], (s["__key__"], ext)
            assert set(s["__offsets__"]) == {k for k in s if not k.startswith("__")}
