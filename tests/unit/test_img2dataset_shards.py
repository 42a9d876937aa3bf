"""Shards laid out as img2dataset writes them (LAION, DataComp, users' crawls) train as written.

img2dataset writes, per sample and in this order, ``key.<jpg|jpeg|webp|png>`` (its
``encode_format``), ``key.txt`` (only when the caption is not empty) and ``key.json`` (its own
keys: url, caption, key, status, error_message, width, height, original sizes, exif, sha256;
DataComp adds uid, face_bboxes and CLIP scores), and beside each ``00000.tar`` a
``00000.parquet`` and ``00000_stats.json``. These tests build such a folder with
``ShardWriter`` and check both loaders (PIL and DALI on the CPU), the glob/folder specs and
``tulip-mega data stats`` on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tulip_mega.data.image_files import MISSING_IMAGE, edit_file, image_file
from tulip_mega.data.sample_stream import read_caption
from tulip_mega.data.shards import ShardWriter, expand_shards
from tulip_mega.data.simple_loader import SimpleLoader
from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer

SIZE = 16  # every image is written at the loaders' size, so no resize touches the pixels
CTX = 16
# (image format, PIL save arguments, lossless?) cycled over the good samples.
FORMATS = [("jpg", "JPEG", {"quality": 90}, False), ("webp", "WEBP", {"lossless": True}, True),
           ("png", "PNG", {}, True), ("jpeg", "JPEG", {"quality": 90}, False),
           ("webp", "WEBP", {"quality": 80}, False), ("png", "PNG", {}, True)]
WORDS = ["red", "blue", "green", "circle", "square", "small", "large", "photo", "of", "a", "cat", "dog"]
BAD = {  # key -> the skip reason the loaders must log
    "000000003": "missing caption (.txt)",  # img2dataset writes no .txt for an empty caption
    "000000007": "empty caption",
    "000000011": MISSING_IMAGE,
}
DATACOMP = "000000009"  # json carries DataComp's uid, face_bboxes and CLIP scores
GECO = "000000005"  # img2dataset json + a GeCo paraphrase, and a pos.webp edit: valid True there
NUM = 14


def _pixels(i: int) -> np.ndarray:
    """Sample i's image: random 4x4 blocks (distinct per sample; smooth enough for lossy codecs)."""
    grid = np.random.default_rng(i).integers(0, 256, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(grid, 4, axis=0), 4, axis=1)


def _encode(pixels: np.ndarray, fmt: str, kw: dict) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _caption(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5))


def _meta(key: str, caption: str, image: bytes) -> dict:
    """img2dataset's own json keys for a downloaded sample."""
    return {"url": f"https://example.com/{key}.jpg", "caption": caption or None, "key": key, "status": "success",
            "error_message": None, "width": SIZE, "height": SIZE, "original_width": 640, "original_height": 480,
            "exif": "{\"Image Orientation\": \"Horizontal (normal)\"}", "sha256": hashlib.sha256(image).hexdigest()}


@pytest.fixture(scope="module")
def img2ds(tmp_path_factory) -> dict:
    """Two shards (8 + 6 samples) of img2dataset's layout, with its parquet and stats beside them."""
    root = tmp_path_factory.mktemp("img2ds")
    expected: dict[str, tuple[str, np.ndarray, bool]] = {}  # good key -> (ext, pixels, lossless)
    captions = []
    with ShardWriter(str(root / "%05d.tar"), max_samples_per_shard=8) as w:
        for i in range(NUM):
            key = f"{i:09d}"
            ext, fmt, kw, lossless = FORMATS[i % len(FORMATS)]
            pixels = _pixels(i)
            image = _encode(pixels, fmt, kw)
            caption = "   " if key == "000000007" else _caption(i)
            meta = _meta(key, caption.strip(), image)
            if key == DATACOMP:
                meta.update(uid="5f1c0a3e9b2d4c6e8a0b1c2d3e4f5a6b", face_bboxes=[[0.1, 0.2, 0.3, 0.4]],
                            clip_b32_similarity_score=0.312, clip_l14_similarity_score=0.274)
            sample: dict = {"__key__": key}
            if key != "000000011":
                sample[ext] = image
            if key != "000000003":
                sample["txt"] = caption
            if key == GECO:
                meta["paraphrases"] = ["a photo of a red cat"]
                sample["pos.webp"] = _encode(_pixels(100), "WEBP", {"lossless": True})
            sample["json"] = meta
            w.write(sample)
            if key not in BAD:
                expected[key] = (ext, pixels, lossless)
                captions.append(caption)
    for shard in ("00000", "00001"):  # what img2dataset writes beside each tar
        (root / f"{shard}.parquet").write_bytes(b"PAR1" + b"\0" * 32 + b"PAR1")
        (root / f"{shard}_stats.json").write_text(json.dumps({"count": 8, "successes": 8, "status_dict": {}}))
    tok = train_tokenizer(captions + ["a photo of a red cat"], str(root / "tok" / "spm"), vocab_size=64)
    return {"dir": str(root), "good": expected, "tok": Tokenizer(tok, CTX)}


def _to_pixels(images: torch.Tensor) -> np.ndarray:
    """Loader output [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _check_batches(batches, good: dict, caplog, stats: dict) -> None:
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(good)  # exactly the good samples, each once
    assert stats["skipped"] == len(BAD) and stats["samples"] == len(good)
    lossless = 0
    for b in batches:
        for key, got in zip(b.keys, _to_pixels(b.images)):
            _, want, exact = good[key]
            if exact:
                np.testing.assert_array_equal(got, want, err_msg=key)
                lossless += 1
            else:  # lossy jpg / webp: close on average
                assert np.abs(got.astype(int) - want).mean() < 20, key
    assert lossless == 5  # 3 png + 2 lossless webp among the good samples
    for key, reason in BAD.items():
        assert any(key in r.getMessage() and reason in r.getMessage() for r in caplog.records), (key, reason)


# --------------------------------------------------------------------------- files and specs


def test_folder_and_glob_specs_pick_only_the_tars(img2ds) -> None:
    d = img2ds["dir"]
    tars = [os.path.join(d, "00000.tar"), os.path.join(d, "00001.tar")]
    assert expand_shards(d) == tars
    assert expand_shards(os.path.join(d, "0000*")) == tars  # .parquet and _stats.json left out
    with pytest.raises(FileNotFoundError, match=r"matched 2 files but no tar shards .*00000.parquet"):
        expand_shards(os.path.join(d, "*.parquet"))


def test_image_file_priority_and_reasons() -> None:
    assert image_file({"png": b"p", "jpg": b"j", "webp": b"w"}) == "jpg"
    assert image_file({"png": b"p", "webp": b"w"}) == "webp"
    assert image_file({"__offsets__": {"jpeg": (512, 10)}, "txt": b"t"}) == "jpeg"  # a reader worker's record
    assert image_file({"txt": b"t", "json": b"{}"}) is None
    assert edit_file({"jpg": b"j", "pos.png": b"p"}, "pos") == "pos.png" and edit_file({"jpg": b"j"}, "neg") is None
    assert MISSING_IMAGE == "missing image (.jpg, .jpeg, .webp or .png)"
    assert read_caption({"webp": b"x", "txt": b"a cat"}) == ("a cat",)
    assert read_caption({"png": b"x"}) == "missing caption (.txt)"
    assert read_caption({"txt": b"a cat", "json": b"{}"}) == MISSING_IMAGE
    assert read_caption({"txt": b"a cat", "__partial__": True}) is None  # the damaged shard counts it


# --------------------------------------------------------------------------- loaders


def test_simple_loader_reads_img2dataset_shards(img2ds, caplog) -> None:
    caplog.set_level(logging.WARNING)
    loader = SimpleLoader(img2ds["dir"], batch_size=4, image_size=SIZE, tokenizer=img2ds["tok"], shuffle_buffer=0,
                          num_epochs=1)
    batches = list(loader)
    _check_batches(batches, img2ds["good"], caplog, loader.stats())


def _dali(img2ds, plan, **kw):
    pytest.importorskip("nvidia.dali")
    from tulip_mega.data.dali_loader import DaliLoader

    return DaliLoader(img2ds["dir"], 4, plan, img2ds["tok"], gpu=False, threads=1, shuffle_buffer=0, num_epochs=1,
                      **kw)


def test_dali_loader_decodes_webp_and_png_on_the_cpu(img2ds, caplog) -> None:
    """fn.decoders.image (device cpu) reads every format; png and lossless webp bit-exactly."""
    from tulip_mega.data.dali_pipeline import ViewPlan

    caplog.set_level(logging.WARNING)
    loader = _dali(img2ds, ViewPlan(image_size=SIZE))
    batches = list(loader)
    _check_batches(batches, img2ds["good"], caplog, loader.stats())
    assert loader.stats()["pipeline_rebuilds"] == 0  # nothing reached DALI that it could not decode


def test_tulip_plan_reads_img2dataset_json_as_no_geco_fields_with_any_worker_count(img2ds) -> None:
    from tulip_mega.data.dali_pipeline import ViewPlan

    plan = ViewPlan(image_size=SIZE, crops=1, edits=True, paraphrases=2, negatives=2, regions=1)
    runs = [list(_dali(img2ds, plan, reader_workers=workers, read_chunk_size=4)) for workers in (0, 2)]
    batches = runs[0]
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(img2ds["good"])
    for b in batches:
        for i, key in enumerate(b.keys):
            geco = key == GECO  # the only sample with a paraphrase and an edit (pos.webp)
            assert b.paraphrase_valid[i].tolist() == [geco, False], key
            assert not b.negative_valid[i].any() and not b.region_valid[i].any(), key
            assert b.edit_valid[i].tolist() == [geco, False], key
            if geco:
                np.testing.assert_array_equal(_to_pixels(b.edits[i, :1])[0], _pixels(100))
            else:
                assert (b.edits[i] == 0).all()
    for a, b in zip(*runs, strict=True):  # reader workers (offsets, not bytes): the same batches
        assert a.keys == b.keys
        for name in ("images", "crops", "edits", "edit_valid", "tokens", "paraphrases", "paraphrase_valid",
                     "negative_valid", "region_valid"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


# --------------------------------------------------------------------------- data stats


def test_data_stats_reports_image_formats_and_missing_captions(img2ds, capsys) -> None:
    from tulip_mega.cli import main

    capsys.readouterr()
    # exit 1: the loaders will skip samples (the problems), though the set trains as it is
    assert main(["data", "stats", "--data", img2ds["dir"]]) == 1
    stats = json.loads(capsys.readouterr().out)
    assert stats["shards"] == 2 and stats["samples"] == NUM
    # 14 samples cycle jpg, webp, png, jpeg, webp, png; sample 11 (a png) has no image
    assert stats["image_formats"] == {"jpeg": 2, "jpg": 3, "png": 3, "webp": 5}
    assert stats["problems"] == {"empty caption": 1, "missing caption (.txt)": 1, MISSING_IMAGE: 1}
    assert stats["fields"]["json"] == NUM and stats["fields"]["txt"] == NUM - 1
