"""WebDataset tar shards, read and written with the standard library only.

A shard is a plain tar of files named ``key.ext``; consecutive files sharing a key (the
basename up to its FIRST '.') form one sample, e.g. ``000042.jpg`` + ``000042.txt`` +
``000042.pos.jpg``. We do not depend on the ``webdataset`` package: the format is tiny, and
owning the reader lets us (a) keep every good sample that precedes damage in a truncated
shard and (b) report that damage as one clear, catchable error naming the shard, which the
loaders turn into "skip and count" instead of a crash hours into a run.

Shards are written to ``<name>.tmp`` and renamed only when complete, so a reader (or a
brace spec) never picks up a half-written shard after a crash.

Shards may also be object-store URLs (``s3://``, ``msc://profile/...``; see ``object_store``):
specs expand against the store's listing, and a shard's bytes are fetched whole and parsed by
the same reader as a local file.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO, Literal, NamedTuple, Optional

import numpy as np

from tulip_mega.data import object_store
from tulip_mega.data.energon_meta import energon_shards, is_energon_dataset

__all__ = ["ShardReadError", "ShardWriter", "expand_shards", "iter_samples", "split_name"]

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Magic numbers of compressed tars; their decompressors detect truncation themselves.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
_BLOCK = tarfile.BLOCKSIZE
# What a glob keeps: tar shards, plain or compressed. img2dataset writes ``00000.parquet`` and
# ``00000_stats.json`` beside each ``00000.tar``, and ``tulip-mega data index`` writes
# ``00000.tar.idx``: ``dir/0000*`` must not hand those to the tar reader.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class ShardReadError(Exception):
    """A shard is truncated or corrupt; raised AFTER every good sample before the damage.

    Attributes: ``shard`` (path), ``last_key`` (key of the last good sample yielded, or None),
    ``num_good`` (samples yielded before the damage), ``reason`` (what went wrong).
    """

    def __init__(self, shard: str, reason: str, last_key: str | None, num_good: int) -> None:
        self.shard = shard
        self.reason = reason
        self.last_key = last_key
        self.num_good = num_good
        where = f"after key {last_key!r}" if last_key is not None else "before its first sample"
        super().__init__(
            f"shard {shard} is truncated or corrupt {where} ({reason}); "
            f"{num_good} good samples were read before the damage, the rest of the shard is lost"
        )


# --------------------------------------------------------------------------- shard specs


def _split_top_level_commas(spec: str) -> list[str]:
    """Split on commas that are not inside braces (so ``{a,b}`` would survive)."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_braces(pattern: str) -> list[str]:
    """Expand every ``{000..007}`` range (cartesian product, zero-padding kept)."""
    pieces = _BRACE_RANGE.split(pattern)
    # pieces = [lit, lo, hi, lit, lo, hi, lit, ...]
    literals = pieces[0::3]
    ranges = []
    for lo_s, hi_s in zip(pieces[1::3], pieces[2::3]):
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"shard spec {pattern!r}: empty brace range {{{lo_s}..{hi_s}}}")
        width = len(lo_s) if lo_s.startswith("0") or len(lo_s) == len(hi_s) else 0
        ranges.append([str(i).zfill(width) for i in range(lo, hi + 1)])
    out = []
    for combo in itertools.product(*ranges):
        s = literals[0]
        for value, lit in zip(combo, literals[1:]):
            s += value + lit
        out.append(s)
    return out


def _expand_one(part: str, spec: str) -> list[str]:
    url = object_store.is_url(part)
    path = part if url else os.path.expanduser(part)
    if not url and os.path.isdir(path) and is_energon_dataset(path):  # its split.yaml's train shards
        try:
            return energon_shards(path, "train")
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"shard spec {spec!r}: energon dataset {part!r}: {e}") from e
    if _BRACE_RANGE.search(path):
        paths = _expand_braces(path)
        missing = object_store.missing_objects(paths) if url else [p for p in paths if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            raise FileNotFoundError(
                f"shard spec {spec!r}: {len(missing)} of {len(paths)} shards from the brace range "
                f"{part!r} do not exist: {shown}"
            )
        return paths
    if url:
        return object_store.expand_url(part, spec)
    if os.path.isdir(path):
        paths = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        if not paths:
            raise FileNotFoundError(f"shard spec {spec!r}: directory {part!r} contains no *.tar files")
        return paths
    if _GLOB_CHARS.search(path):
        files = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"shard spec {spec!r}: glob {part!r} matched no files")
        paths = [p for p in files if p.lower().endswith(SHARD_SUFFIXES)]
        if not paths:
            shown = ", ".join(os.path.basename(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
            raise FileNotFoundError(f"shard spec {spec!r}: glob {part!r} matched {len(files)} files but no tar "
                                    f"shards (names ending {', '.join(SHARD_SUFFIXES)}): {shown}")
        return paths
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard spec {spec!r}: shard file {part!r} does not exist")
    return [path]


def expand_shards(spec: str) -> list[str]:
    """Turn a shard spec into an explicit, ordered list of existing shard files.

    Accepted forms (combinable with commas): a brace range ``dir/train-{000000..000007}.tar``
    (zero padding kept), a glob ``dir/train-*.tar`` (sorted; only names ending in
    ``SHARD_SUFFIXES`` are kept, so img2dataset's ``.parquet`` / ``_stats.json`` and our ``.idx``
    files beside the tars are left out), a directory (all ``*.tar`` sorted; for a prepared energon dataset
    folder, the shards of its ``train`` split from ``.nv-meta/split.yaml``, in that order) or a plain file; each
    may be an object-store URL instead of a path (``s3://bucket/prefix/train-{000000..000007}.tar``,
    ``s3://bucket/prefix/train-*.tar``, a folder ``s3://bucket/prefix/``, ``msc://profile/...``;
    see ``object_store``). Every failure is a FileNotFoundError naming the spec and what was
    looked for, so a typo fails at startup instead of as an empty epoch.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise FileNotFoundError(f"empty shard spec {spec!r}: expected a brace range, glob, directory or file list")
    paths: list[str] = []
    for part in _split_top_level_commas(spec):
        paths.extend(_expand_one(part, spec))
    return paths


# --------------------------------------------------------------------------- reading


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.pos.jpg`` -> (``dir/abc``, ``pos.jpg``); None for names without an extension."""
    dirname, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (posixpath.join(dirname, stem) if dirname else stem), ext.lower()


Opener = Callable[[], BinaryIO]  # a fresh binary file object over one shard's bytes per call


def _opener(path: str) -> Opener:
    """How the readers open ``path``: the local file, or for a URL the object fetched once
    through MSC and kept in memory (the lean reader's fallback to tarfile re-reads it from
    there, not from the store). An object that cannot be fetched raises OSError at the first
    call, as ``open`` does for a missing file, so both end as the same damage report."""
    if not object_store.is_url(path):
        return lambda: open(path, "rb")
    fetched: list[bytes] = []

    def remote() -> BinaryIO:
        if not fetched:
            fetched.append(object_store.read_object(path))
        return io.BytesIO(fetched[0])

    return remote


def _is_compressed(opener: Opener) -> bool:
    with opener() as f:
        head = f.read(6)
    return head.startswith(_COMPRESSED_MAGIC)


def _end_marker_ok(fileobj: Any, offset: int) -> bool:
    """True when a zero block (tar end-of-archive marker) sits at ``offset``.

    Python's tarfile silently treats a truncated or garbled header as the end of the archive;
    checking for the real end marker is how we tell "finished" from "cut off".
    """
    fileobj.seek(offset)
    block = fileobj.read(_BLOCK)
    return len(block) == _BLOCK and block.count(0) == _BLOCK


def iter_samples(path: str, offsets: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard as ``{"__key__", "__shard__", ext: bytes, ...}``.

    Files of one sample must be consecutive in the tar (WebDataset convention). On damage
    (truncated data or header, garbage, unreadable file) the samples before the damage are
    yielded first, then ShardReadError is raised naming the shard, so the caller decides whether
    that is fatal (tools) or skip-and-count (training loaders).

    The sample being assembled when the damage hit may have lost files that came after it, so
    it is yielded with ``"__partial__": True`` holding only the files read intact: a consumer
    keeps it when everything it needs is there (no good sample lost) and otherwise drops it as
    part of the one shard-level error (so the damage is counted once wherever the cut fell).

    ``offsets=True`` adds ``"__offsets__": {ext: (byte offset, size)}`` for each file read intact
    of an uncompressed tar, so a file can be read again later with ``os.pread`` (the DALI
    loader's reader workers send offsets instead of image bytes between processes). A URL shard
    (``s3://...``) is fetched whole into memory through multi-storage-client (fine for WebDataset
    shards of ~100 MB-1 GB) and parsed by the same readers; its samples never carry
    ``__offsets__`` (``os.pread`` cannot read an object), so they keep their image bytes, as
    compressed shards do. Damage raises the same ShardReadError, naming the URL.

    Uncompressed shards are read by ``_iter_lean`` (about 5x less CPU than tarfile: plain
    headers parsed with one regex each, the rare others by tarfile one member at a time). Any
    damage, and anything else it does not handle, hands the shard to ``_iter_tarfile``, which
    re-reads it and continues after the samples already yielded, so samples, partial samples
    and error messages are tarfile's in every case.
    """
    path = os.fspath(path)
    opener = _opener(path)
    offsets = offsets and not object_store.is_url(path)
    yielded = 0
    try:
        for sample in _iter_lean(path, offsets, opener):
            yield sample
            yielded += 1
        return
    except (_Unusual, OSError):
        pass
    samples = _iter_tarfile(path, offsets, opener)
    for _ in range(yielded):  # the lean reader got these from the same bytes
        next(samples)
    yield from samples


class Members(NamedTuple):
    """File members read intact from a tar, in order, as parallel lists: one record per run of
    headers rather than one object per file, since this is the loaders' hot loop."""

    names: list[str]  # member names, e.g. "000042.pos.jpg"
    offsets: list[int]  # byte offset of each file's data in the tar
    data: list[bytes]


class Damage(NamedTuple):
    """Where reading a shard stopped and why; ``name``: the member whose data could not be read
    (its header was intact, so its key is known), None when a header or the archive's end is bad."""

    reason: str
    name: Optional[str] = None


def _group(path: str, runs: Iterable[Members | Damage], offsets: bool) -> Iterator[dict[str, Any]]:
    """Samples from member runs: consecutive files sharing a key (``split_name``) form one
    sample; files without an extension are ignored. A ``Damage`` ends the shard (``_damaged``)."""
    pending: dict[str, Any] | None = None
    num_good, last_key = 0, None
    for run in runs:
        if isinstance(run, Damage):
            yield from _damaged(path, run, pending, num_good, last_key)
        for name, at, data in zip(*run):
            if "/" in name:
                split = split_name(name)
                if split is None:
                    continue
                key, ext = split
            else:  # split_name without the path split
                key, dot, ext = name.partition(".")
                if not dot or not key or not ext:
                    continue
                ext = ext.lower()
            if pending is not None and pending["__key__"] != key:
                yield pending
                num_good, last_key = num_good + 1, pending["__key__"]
                pending = None
            if pending is None:
                pending = {"__key__": key, "__shard__": path}
            pending[ext] = data
            if offsets:
                pending.setdefault("__offsets__", {})[ext] = (at, len(data))
    if pending is not None:
        yield pending


def _damaged(path: str, damage: Damage, pending: dict[str, Any] | None, num_good: int,
             last_key: str | None) -> Iterator[dict[str, Any]]:
    """The sample being assembled when ``damage`` stopped the reading, then ShardReadError.

    It is complete when the damaged member starts another sample; otherwise it may have lost
    files that came after it, and is yielded with ``"__partial__": True``."""
    split = None if damage.name is None else split_name(damage.name)
    if pending is not None and split is not None and split[0] != pending["__key__"]:
        yield pending
        num_good, last_key, pending = num_good + 1, pending["__key__"], None
    if pending is not None:
        pending["__partial__"] = True
        yield pending
        num_good, last_key = num_good + 1, pending["__key__"]
    raise ShardReadError(path, damage.reason, last_key, num_good)


# --------------------------------------------------------------------------- the lean reader


class _Unusual(Exception):
    """The lean reader met something it leaves to tarfile (damage, global pax headers, compression)."""


_WINDOW = 1 << 22  # bytes read at a time by the lean reader
_BATCH = 256  # headers whose checksums are checked at once
_ZERO_BLOCK = bytes(_BLOCK)
_OCT = rb"(?:[0-7]{%d}[\0 ]|[0-7]{%d} \0|[0-7]{%d})"
# Bytes 100-156 of a header as tarfile and GNU tar write them for a regular file or directory:
# mode, uid, gid, size, mtime, chksum (octal, NUL or space ended), then the type flag.
_HEADER = re.compile(b"".join((
    _OCT % (7, 6, 8), _OCT % (7, 6, 8), _OCT % (7, 6, 8), b"(" + _OCT % (11, 10, 12) + b")",
    _OCT % (11, 10, 12), b"(" + _OCT % (7, 6, 8) + rb"|[0-7]{6}\0 )", rb"([0\x005])",
)))
_DEVICES = re.compile(b"(?:" + _OCT % (7, 6, 8) + rb"|\0{8}){2}")  # devmajor, devminor


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)  # tarfile's nti for these forms


class _Window:
    """Bytes [base, base + len(buf)) of an open shard, read ahead ``_WINDOW`` bytes at a time."""

    __slots__ = ("f", "end", "buf", "base")

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.end = f.seek(0, os.SEEK_END)  # a file or an in-memory object (no fileno for fstat)
        f.seek(0)
        self.buf = f.read(min(_WINDOW, self.end))
        self.base = 0  # file offset of buf[0]; the file position is base + len(buf)

    def cover(self, start: int, stop: int) -> int:
        """Make ``buf`` hold bytes [start, stop) of the file; returns start's index in it."""
        buf, base, f = self.buf, self.base, self.f
        if stop <= base + len(buf):
            return start - base
        if start <= base + len(buf):
            buf = buf[start - base:] + f.read(max(_WINDOW, stop - base - len(buf)))
        else:
            f.seek(start)
            buf = f.read(max(_WINDOW, stop - start))
        self.buf, self.base = buf, start
        if stop > start + len(buf):
            raise _Unusual(f"the file changed while reading byte {stop}")
        return 0


class _Scan(NamedTuple):
    """A run of headers read by ``_scan``, with what checking their checksums needs."""

    members: Members
    heads: list[bytes]  # every header of the run (directories too), raw
    sums: list[int]  # their stored checksums
    dirs: list[int]  # indices in heads of the directories (no member)
    pos: int  # file offset of the next header
    stop: Literal["full", "marker", "special"]  # _BATCH headers / end of archive / a header for tarfile


def _scan(win: _Window, pos: int) -> _Scan:
    """Plain headers from ``pos`` on, each parsed with one regex, up to _BATCH of them, the
    end-of-archive marker or a header the regex does not cover (pax or GNU long names, links,
    a ustar prefix, a file cut off). No room for a header is _Unusual."""
    names: list[str] = []
    offs: list[int] = []
    datas: list[bytes] = []
    heads: list[bytes] = []
    sums: list[int] = []
    dirs: list[int] = []
    buf, base, end = win.buf, win.base, win.end
    stop: Literal["full", "marker", "special"] = "full"
    while len(heads) < _BATCH:
        if pos + _BLOCK > end:
            raise _Unusual("cut")  # no room for a header or an end marker (nothing unchecked is pending)
        r = pos - base
        if pos + _BLOCK > base + len(buf):
            r = win.cover(pos, pos + _BLOCK)
            buf, base = win.buf, win.base
        if buf[r] == 0 and buf[r:r + _BLOCK] == _ZERO_BLOCK:
            stop = "marker"
            break
        m = _HEADER.match(buf, r + 100, r + 157)
        if m is None or buf[r + 345] != 0 or _DEVICES.match(buf, r + 329, r + 345) is None:
            stop = "special"
            break
        size_field, sum_field, kind = m.groups()
        name = buf[r:r + 100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        if kind == b"5" or (kind == b"\0" and name.endswith("/")):
            dirs.append(len(heads))
            heads.append(buf[r:r + _BLOCK])
            sums.append(_octal(sum_field))
            pos += _BLOCK
            continue
        size = _octal(size_field)
        data_at = pos + _BLOCK
        if data_at + size > end:
            stop = "special"  # data cut off: tarfile says what it makes of it
            break
        if data_at + size > base + len(buf):
            r = win.cover(pos, data_at + size)
            buf, base = win.buf, win.base
        heads.append(buf[r:r + _BLOCK])
        sums.append(_octal(sum_field))
        names.append(name)
        offs.append(data_at)
        datas.append(buf[r + _BLOCK:r + _BLOCK + size])
        pos = data_at + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    return _Scan(Members(names, offs, datas), heads, sums, dirs, pos, stop)


def _checked(scan: _Scan) -> Members:
    """The scan's members, or those before the first header whose unsigned checksum (what
    tarfile checks) is wrong, followed by _Unusual from ``_lean_runs``."""
    if not scan.heads:
        return scan.members
    blocks = np.frombuffer(b"".join(scan.heads), dtype=np.uint8).reshape(len(scan.heads), _BLOCK)
    got = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 256
    bad = np.flatnonzero(got != np.asarray(scan.sums, dtype=np.int64))
    if not len(bad):
        return scan.members
    kept = int(bad[0]) - sum(1 for d in scan.dirs if d < bad[0])
    names, offs, datas = scan.members
    return Members(names[:kept], offs[:kept], datas[:kept])


class _OneByOne:
    """Python's tarfile parsing the headers ``_scan`` leaves, one member at a time."""

    def __init__(self, opener: Opener) -> None:
        self.opener = opener
        self.f: BinaryIO | None = None  # its own file object: the window's position must not move
        self.tf: tarfile.TarFile | None = None  # opened at the first such header

    def read_into(self, members: Members, win: _Window, pos: int) -> int:
        """Append the member whose header is at ``pos`` (when it is a file); returns the next
        header's offset. Damage, and what the lean reader does not handle, is _Unusual."""
        if self.tf is None:
            self.f = self.opener()
            self.tf = tarfile.open(fileobj=self.f, mode="r:")
            self.tf.next()  # the first member, parsed at open
        tf = self.tf
        tf.fileobj.seek(pos)
        tf.offset = pos
        info = tf.next()
        if info is None or tf.pax_headers:  # damage or an end tarfile sees; global pax headers
            raise _Unusual(f"header at byte {pos}")
        if info.isfile():
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None \
                    or info.offset_data + info.size > win.end:
                raise _Unusual(f"member at byte {pos}")
            r = win.cover(info.offset_data, info.offset_data + info.size)
            members.names.append(info.name)
            members.offsets.append(info.offset_data)
            members.data.append(win.buf[r:r + info.size])
        return tf.offset

    def close(self) -> None:
        if self.tf is not None:
            self.tf.close()
        if self.f is not None:
            self.f.close()


def _lean_runs(opener: Opener) -> Iterator[Members]:
    """The members of an uncompressed shard, a checksum-checked run of headers at a time.

    Whatever would make tarfile stop or fail (a bad checksum, garbage, a cut file, a pax
    global header, sparse files, compression) raises _Unusual before any member that is not
    fully checked is handed on."""
    with opener() as f, contextlib.closing(_OneByOne(opener)) as one:
        win = _Window(f)
        if win.buf.startswith(_COMPRESSED_MAGIC):
            raise _Unusual("compressed")
        pos = 0
        try:
            while True:
                scan = _scan(win, pos)
                members = _checked(scan)
                if members is not scan.members:
                    yield members
                    raise _Unusual(f"bad checksum before byte {scan.pos}")
                pos = scan.pos
                if scan.stop == "special":
                    pos = one.read_into(members, win, pos)
                yield members
                if scan.stop == "marker":
                    return
        except (tarfile.TarError, EOFError) as e:
            raise _Unusual(f"{type(e).__name__}: {e}") from e


def _iter_lean(path: str, offsets: bool, opener: Optional[Opener] = None) -> Iterator[dict[str, Any]]:
    """``iter_samples`` for uncompressed tars without damage; _Unusual for anything else."""
    return _group(path, _lean_runs(opener or _opener(path)), offsets)


# --------------------------------------------------------------------------- the tarfile reader


def _tarfile_runs(opener: Opener, compressed: bool) -> Iterator[Members | Damage]:
    """The file members of any shard, one per run, read by Python's tarfile; a ``Damage`` where
    reading stops (a bad header, an unreadable file, no end-of-archive marker)."""
    try:
        f = opener()
    except OSError as e:
        yield Damage(f"cannot open: {type(e).__name__}: {e}")
        return
    try:
        tf = tarfile.open(fileobj=f, mode="r:*" if compressed else "r:")
    except (OSError, tarfile.TarError, EOFError) as e:
        f.close()
        yield Damage(f"cannot open: {type(e).__name__}: {e}")
        return
    with f, tf:
        members = iter(tf)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except (OSError, tarfile.TarError, EOFError) as e:
                yield Damage(f"bad header: {type(e).__name__}: {e}")
                return
            if not member.isfile() or split_name(member.name) is None:
                continue
            try:
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
            except (OSError, tarfile.TarError, EOFError) as e:
                yield Damage(f"{member.name}: {type(e).__name__}: {e}", member.name)
                return
            yield Members([member.name], [member.offset_data], [data])
        if not compressed and not _end_marker_ok(tf.fileobj, tf.offset):
            yield Damage(f"no end-of-archive marker at byte {tf.offset} (file cut off or garbled header)")


def _iter_tarfile(path: str, offsets: bool, opener: Optional[Opener] = None) -> Iterator[dict[str, Any]]:
    """``iter_samples`` with Python's tarfile: any shard, every damage case (the reference)."""
    path = os.fspath(path)
    opener = opener or _opener(path)
    try:
        compressed = _is_compressed(opener)
    except OSError:
        compressed = False  # opening fails the same way in _tarfile_runs, which reports it
    offsets = offsets and not compressed and not object_store.is_url(path)
    return _group(path, _tarfile_runs(opener, compressed), offsets)


# --------------------------------------------------------------------------- writing


def _encode_value(ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"sample field {ext!r}: cannot store a {type(value).__name__} (give bytes, str, dict or list)")


class ShardWriter:
    """Write samples into ``pattern % index`` shards of at most ``max_samples_per_shard``.

    Each shard is built as ``<name>.tmp`` and atomically renamed when full or on ``close()``;
    used as a context manager, an exception discards the unfinished shard, so no file ever has
    a final shard name without being complete. Metadata (mtime, owner) is fixed, making the
    bytes a pure function of the samples, which keeps synthetic datasets reproducible.
    """

    def __init__(self, pattern: str, max_samples_per_shard: int = 1000, start_index: int = 0) -> None:
        if "%" not in pattern:
            raise ValueError(f"shard pattern {pattern!r} needs a %-format field for the index, e.g. 'train-%06d.tar'")
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        self.pattern = pattern
        self.max_samples_per_shard = max_samples_per_shard
        self.index = start_index
        self.shards: list[str] = []
        self.total = 0
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._path: str | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        self._path = self.pattern % self.index
        self.index += 1
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        self._file = open(self._path + ".tmp", "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._keys = set()

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample: ``{"__key__": str, ext: bytes | str | dict | list, ...}``."""
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in posixpath.basename(key):
            raise ValueError(f"sample needs a '__key__' string without '.', got {key!r}")
        if self._tar is None:
            self._open()
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in shard {self._path}")
        assert self._tar is not None
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = _encode_value(ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        self.total += 1
        if self._count >= self.max_samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._path is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._path + ".tmp", self._path)
        self.shards.append(self._path)
        self._tar = self._file = self._path = None

    def abort(self) -> None:
        """Discard the unfinished shard (its .tmp file); completed shards are kept."""
        if self._file is not None:
            self._file.close()
        if self._path is not None and os.path.exists(self._path + ".tmp"):
            os.remove(self._path + ".tmp")
        self._tar = self._file = self._path = None

    def close(self) -> list[str]:
        """Finish the current shard (if it has samples); return all finished shard paths."""
        if self._tar is not None:
            self._finish()
        return list(self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
