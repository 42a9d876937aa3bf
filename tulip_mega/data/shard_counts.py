"""Per-shard sample counts as OUR reader counts them, kept in ``<root>/.nv-meta/tulip_counts.json``.

Why: the data-parallel split (dp_split) needs every shard's sample count before the first
step, and reading thousands of shards at start-up on every rank is slow. ``tulip-mega data
prepare`` reads each shard once anyway; it records what ``iter_samples`` found (for a damaged
shard: the samples before the damage, a partial last one included, as ``count_samples`` counts
them) with the shard's size and mtime, so a later start-up can trust a count exactly while the
file is unchanged. energon's own ``.info.json`` is not used for this: its counter is tarfile's,
which differs from ours on damaged shards (see energon_prepare).

File format (version 1)::

    {"version": 1, "reader": "tulip_mega.data.shards.iter_samples",
     "shards": {"train-000000.tar": {"samples": 1024, "size": 123, "mtime_ns": 17..., "damage": null}}}

with shard names relative to the dataset root.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from tulip_mega.data.energon_meta import COUNTS_FILE, META_DIR

__all__ = ["VERSION", "counts_path", "recorded_count", "write_counts"]

VERSION = 1
_READER = "tulip_mega.data.shards.iter_samples"
# Loaded counts files by (path, mtime_ns), and shard folder -> counts file (or None) found above it.
_LOADED: dict[tuple[str, int], dict[str, Any]] = {}
_ROOT_OF: dict[str, Optional[str]] = {}


def counts_path(root: str) -> str:
    """Where ``root``'s counts file lives."""
    return os.path.join(os.path.abspath(root), META_DIR, COUNTS_FILE)


def write_counts(root: str, counts: dict[str, tuple[int, Optional[str]]]) -> str:
    """Record ``{shard path: (samples, damage reason or None)}`` for shards under ``root``.

    Written to a temporary file and renamed, so a reader never sees half a file."""
    root = os.path.abspath(root)
    shards: dict[str, Any] = {}
    for shard, (samples, damage) in counts.items():
        st = os.stat(shard)
        rel = os.path.relpath(os.path.abspath(shard), root)
        shards[rel] = {"samples": int(samples), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "damage": damage}
    path = counts_path(root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"version": VERSION, "reader": _READER, "shards": shards}, f, indent=1)
    os.replace(path + ".tmp", path)
    _ROOT_OF.clear()  # folders looked up before this file existed
    return path


def _counts_file_for(folder: str) -> Optional[str]:
    """The nearest ``.nv-meta/tulip_counts.json`` at or above ``folder`` (cached per folder)."""
    if folder in _ROOT_OF:
        return _ROOT_OF[folder]
    found, cur = None, folder
    while True:
        candidate = os.path.join(cur, META_DIR, COUNTS_FILE)
        if os.path.isfile(candidate):
            found = candidate
            break
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    _ROOT_OF[folder] = found
    return found


def _load(path: str) -> Optional[dict[str, Any]]:
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return None
    if key not in _LOADED:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None  # unreadable: count by reading instead (never trust a half-understood file)
        if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("shards"), dict):
            return None
        _LOADED[key] = doc["shards"]
    return _LOADED[key]


def recorded_count(shard: str) -> Optional[int]:
    """``shard``'s recorded count when its size and mtime are still those recorded, else None
    (always for an object-store URL: `data prepare` records local folders)."""
    if "://" in shard:
        return None
    shard = os.path.abspath(shard)
    counts_file = _counts_file_for(os.path.dirname(shard))
    if counts_file is None:
        return None
    shards = _load(counts_file)
    if shards is None:
        return None
    root = os.path.dirname(os.path.dirname(counts_file))
    entry = shards.get(os.path.relpath(shard, root))
    if not isinstance(entry, dict):
        return None
    try:
        st = os.stat(shard)
    except OSError:
        return None
    if st.st_size != entry.get("size") or st.st_mtime_ns != entry.get("mtime_ns"):
        return None
    samples = entry.get("samples")
    return samples if isinstance(samples, int) and samples >= 0 else None
