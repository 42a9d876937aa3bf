"""DALI index files (``wds2idx`` format v1.2) for WebDataset shards, with damage excluded.

Why: ``fn.readers.webdataset`` needs an index per shard (it builds one in memory at start-up
when none is given, which for large sets means reading every tar header on every rank, at
every start). ``tulip-mega data index`` writes them once. Unlike DALI's own ``wds2idx``, the
index only lists samples that ``shards.iter_samples`` reads intact: the damaged tail of a
truncated tar (and the incomplete sample the cut fell into) is left out, so a DALI reader
driven by these files never touches the damage. The training loader itself reads shards with
the Python reader (see dali_loader.py); the index is for tools and DALI-native readers, and its
sample count spares the data-parallel split (``dp_split.shard_sizes``) reading every shard.

Format (one line per sample, components as ``ext offset size name`` groups)::

    v1.2 <num_samples>
    jpg 512 1168 k0.jpg txt 2560 41 k0.txt ...
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import Optional

from tulip_mega.data.object_store import is_url
from tulip_mega.data.shards import ShardReadError, iter_samples, split_name

__all__ = ["IndexResult", "build_index", "ensure_indexes", "index_path"]


@dataclass(frozen=True)
class IndexResult:
    shard: str
    index: str
    samples: int
    damage: Optional[str]  # the ShardReadError message when the shard is truncated/corrupt


def index_path(shard: str, index_dir: Optional[str] = None) -> str:
    """``<index_dir or shard's folder>/<shard name>.idx``."""
    folder = index_dir if index_dir is not None else os.path.dirname(os.path.abspath(shard))
    return os.path.join(folder, os.path.basename(shard) + ".idx")


def _intact_keys(shard: str) -> tuple[list[str], Optional[str]]:
    keys, damage = [], None
    try:
        for s in iter_samples(shard):
            if not s.get("__partial__"):
                keys.append(s["__key__"])
    except ShardReadError as e:
        damage = str(e)
    return keys, damage


def build_index(shard: str, index_dir: Optional[str] = None) -> IndexResult:
    """Write the index of ``shard`` (atomically: ``.tmp`` then rename); returns what it holds.
    Local shards only: an index records byte offsets for re-reading a file in place."""
    if is_url(shard):
        raise ValueError(f"shard {shard} is an object-store URL: index files are for local shards only "
                         f"(object-store shards are counted by reading them at start-up)")
    keys, damage = _intact_keys(shard)
    wanted = set(keys)
    size = os.path.getsize(shard)
    groups: dict[str, list[str]] = {k: [] for k in keys}
    with tarfile.open(shard, "r:") as tf:
        try:
            for m in tf:
                split = split_name(m.name) if m.isfile() else None
                if split is None or split[0] not in wanted or m.offset_data + m.size > size:
                    continue
                groups[split[0]].append(f"{split[1]} {m.offset_data} {m.size} {m.name}")
        except (OSError, tarfile.TarError, EOFError):
            pass  # the damage is already known from iter_samples; intact samples come before it
    lines = [" ".join(groups[k]) for k in keys if groups[k]]
    out = index_path(shard, index_dir)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
    os.replace(out + ".tmp", out)
    return IndexResult(shard, out, len(lines), damage)


def ensure_indexes(shards: list[str], index_dir: Optional[str] = None) -> list[str]:
    """Index paths for ``shards``, creating the missing (or older-than-the-shard) ones."""
    paths = []
    for shard in shards:
        path = index_path(shard, index_dir)
        if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(shard):
            build_index(shard, index_dir)
        paths.append(path)
    return paths
