"""The lean tar reader (shards._iter_lean via iter_samples) against the tarfile reader.

``iter_samples`` must give exactly what ``shards._iter_tarfile`` gives (samples, their field
order, offsets, partial last samples, ShardReadError messages) on every shard: the shipped
synthetic ones, shards cut or garbled at many places, headers the lean reader has tarfile parse
one at a time (pax long and non-ASCII names, GNU long names, ustar name prefixes, links) and
shards it leaves to tarfile as a whole (gzip, a pax global header).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import pytest

from tulip_mega.data import shards
from tulip_mega.data.shards import ShardReadError, ShardWriter, iter_samples
from tulip_mega.datagen.synthetic import write_shapes_dataset


def _read(fn, path: str, offsets: bool) -> list:
    """Everything a reader gives: the samples (with their field order), then the error, if any."""
    out: list = []
    try:
        for s in fn(path, offsets):
            out.append((list(s), s))
    except ShardReadError as e:
        out.append(("error", str(e), e.shard, e.last_key, e.num_good, e.reason))
    return out


def _same(path: str) -> list:
    """Assert iter_samples == the tarfile reader on ``path`` (with and without offsets)."""
    for offsets in (False, True):
        want = _read(shards._iter_tarfile, path, offsets)
        assert _read(iter_samples, path, offsets) == want, (path, offsets)
    return want


def _lean_reads_all(path: str) -> bool:
    try:
        for _ in shards._iter_lean(path, True):
            pass
    except shards._Unusual:
        return False
    return True


def _sample(i: int, key: str | None = None) -> dict:
    return {"__key__": key or f"s{i:03d}", "jpg": bytes([i % 256]) * (700 + 37 * i), "txt": f"caption {i}",
            "json": {"i": i}}


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    with ShardWriter(str(tmp_path_factory.mktemp("s") / "t-%02d.tar"), 100) as w:
        for i in range(12):
            w.write(_sample(i))
    return w.shards[0]


def test_shipped_shards_equal_and_lean(tmp_path) -> None:
    info = write_shapes_dataset(str(tmp_path), 48, 8, 16, image_size=24, seed=1)
    for path in info["train_shards"] + info["val_shards"]:
        want = _same(path)
        assert want and all(x[0] != "error" for x in want)
        assert _lean_reads_all(path)  # the fast path really reads the shipped shards


def test_cut_anywhere_equal(shard: str, tmp_path) -> None:
    data = open(shard, "rb").read()
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    cuts = {0, 1, 100, 511, 512, 513, len(data) - 1024, len(data) - 512, len(data) - 1}
    for m in members[:6] + members[-3:]:
        cuts |= {m.offset, m.offset + 200, m.offset_data, m.offset_data + 1, m.offset_data + m.size,
                 m.offset_data + m.size + 1}
    for at in sorted(c for c in cuts if 0 <= c < len(data)):
        cut = str(tmp_path / f"cut-{at}.tar")
        with open(cut, "wb") as f:
            f.write(data[:at])
        want = _same(cut)
        marker = members[-1].offset_data + -(-members[-1].size // 512) * 512  # end-of-archive marker
        assert (want[-1][0] == "error") == (at < marker + 512), at  # a cut before a whole marker is reported


def test_garbled_headers_equal(shard: str, tmp_path) -> None:
    data = open(shard, "rb").read()
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    m = members[7]
    marker = members[-1].offset_data + -(-members[-1].size // 512) * 512
    cases = {
        "checksum": (m.offset + 148, b"7"),  # the stored checksum no longer matches
        "name": (m.offset + 3, b"X"),  # the header changed, so the checksum does not match
        "size": (m.offset + 124, b"9"),  # not octal: tarfile's "invalid header"
        "first": (5, b"Z"),  # the very first header: tarfile cannot even open the shard
        "data": (m.offset_data + 10, b"\x00\x01"),  # data bytes are not checked: read as they are
        "end marker": (marker, b"\x01"),  # garbage where the end-of-archive marker was
    }
    for name, (at, patch) in cases.items():
        bad = str(tmp_path / f"{name.replace(' ', '-')}.tar")
        with open(bad, "wb") as f:
            f.write(data[:at] + patch + data[at + len(patch):])
        want = _same(bad)
        assert (want[-1][0] == "error") == (name != "data"), name
    assert "bad checksum" in _same(str(tmp_path / "first.tar"))[-1][1]


def test_unusual_headers_equal(tmp_path) -> None:
    long_key = "dir/" + "k" * 120
    keys = ["a000", long_key, "b002", "caf\u00e9", "c004"]
    pax = ShardWriter(str(tmp_path / "pax-%02d.tar"), 100)
    for i, key in enumerate(keys):  # pax headers for the long and the non-ASCII key
        pax.write(_sample(i, key))
    paths = pax.close()
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):  # GNU 'L' long names; ustar name prefix
        path = str(tmp_path / f"fmt-{fmt}.tar")
        with tarfile.open(path, "w", format=fmt) as tf:
            for i, key in enumerate(["a000", "p/" * 30 + "long", "b002"]):
                for ext, value in (("jpg", b"x" * (100 + i)), ("txt", b"t")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(value)
                    tf.addfile(info, io.BytesIO(value))
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            link = tarfile.TarInfo("c003.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "a000.jpg"
            tf.addfile(link)
            info = tarfile.TarInfo("c003.txt")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
        paths.append(path)
    for path in paths:  # tarfile parses those headers one by one, the lean reader the rest
        assert _lean_reads_all(path), path
        want = _same(path)
        assert all(x[0] != "error" for x in want), path
    assert [s["__key__"] for _, s in _read(iter_samples, paths[0], False)] == keys
    gz = str(tmp_path / "gz.tar")
    with open(paths[0], "rb") as f, open(gz, "wb") as g:
        g.write(gzip.compress(f.read()))
    glob_pax = str(tmp_path / "global.tar")  # a pax global header applies to every later member
    with tarfile.open(glob_pax, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tf:
        for ext in ("jpg", "txt"):
            info = tarfile.TarInfo(f"k.{ext}")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"abcd"))
    for path, count in ((gz, len(keys)), (glob_pax, 1)):  # left to tarfile as a whole
        assert not _lean_reads_all(path), path
        want = _same(path)
        assert len(want) == count and all(x[0] != "error" for x in want), path
    # a long name whose pax header is cut or garbled: tarfile's verdict either way
    data = open(paths[0], "rb").read()
    with tarfile.open(paths[0]) as tf:
        m = tf.getmember(long_key + ".jpg")
    for name, patched in (("cut-pax", data[: m.offset + 700]), ("bad-pax", data[: m.offset + 3] + b"?" + data[m.offset + 4:])):
        bad = str(tmp_path / f"{name}.tar")
        with open(bad, "wb") as f:
            f.write(patched)
        assert _same(bad)[-1][0] == "error", name


def test_directories_and_trailing_data_equal(tmp_path) -> None:
    path = str(tmp_path / "dirs.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name in ("top", "top/sub"):
            d = tarfile.TarInfo(name)
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for i in range(3):
            for ext in ("jpg", "txt", "pos.jpg"):
                info = tarfile.TarInfo(f"top/sub/k{i}.{ext}")
                info.size = 513 * (i + 1)
                tf.addfile(info, io.BytesIO(b"z" * info.size))
    assert _lean_reads_all(path)
    assert [s["__key__"] for _, s in _read(iter_samples, path, False)] == ["top/sub/k0", "top/sub/k1", "top/sub/k2"]
    _same(path)
    with open(path, "ab") as f:  # bytes after the end-of-archive marker are ignored by both
        f.write(b"junk" * 300)
    _same(path)
    empty = str(tmp_path / "empty.tar")
    open(empty, "wb").close()
    assert _same(empty)[-1][0] == "error"
    assert os.path.getsize(empty) == 0
