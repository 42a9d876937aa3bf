"""Read megatron-energon's dataset metadata: which shards a split holds, and blend YAMLs.

Why: energon's dataset folders (``energon prepare`` / ``tulip-mega data prepare``) and its
MetadatasetV2 YAMLs are the dataset description we share with other megatron tools, but our
training read path stays our own tar reader (energon's raw read costs several times our whole
host path per sample; see benchmarks/RESULTS.md). So we only need the *description*: the
shard list of a split (``.nv-meta/split.yaml`` with energon's brace patterns and excludes)
and the (path, weight) pairs of a blend. This module reads those files with pyyaml and
braceexpand, with errors naming the file and the key, and rejects what we cannot honour
(sample-level excludes, joins, subflavors, sub-ranges) instead of silently ignoring it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import braceexpand
import yaml

__all__ = ["BlendEntry", "COUNTS_FILE", "META_DIR", "energon_shards", "is_energon_dataset", "read_metadataset"]

META_DIR = ".nv-meta"  # energon's metadata folder inside a dataset root
SPLIT_FILE = "split.yaml"
COUNTS_FILE = "tulip_counts.json"  # our reader's per-shard counts, written by `tulip-mega data prepare`

# Keys of a MetadatasetV2 dataset reference that only energon's own loader can honour.
_UNSUPPORTED_REF_KEYS = ("subflavors", "subset", "split_part", "aux", "dataset_config", "split_config",
                         "shuffle_over_epochs_multiplier", "join", "joiner", "blend", "blend_epochized")


@dataclass(frozen=True)
class BlendEntry:
    """One dataset of a blend: ``path`` (absolute energon dataset folder) drawn with ``weight``."""

    name: str
    path: str
    weight: float


def is_energon_dataset(path: str) -> bool:
    """True when ``path`` is a prepared energon dataset folder (``<path>/.nv-meta/split.yaml`` exists)."""
    return os.path.isfile(os.path.join(path, META_DIR, SPLIT_FILE))


def _load_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e


def energon_shards(root: str, split_part: str = "train") -> list[str]:
    """Absolute paths of the shards of ``split_part`` in ``root``'s ``.nv-meta/split.yaml``, in order.

    ``split_parts.<part>`` lists shard names relative to ``root`` with energon's brace patterns
    (``train-{000000..000007}.tar``); ``exclude`` names shards to leave out. An exclude of one
    sample (``shard.tar/17``) is refused: our reader reads whole shards.
    """
    root = os.path.abspath(os.path.expanduser(root))
    split_file = os.path.join(root, META_DIR, SPLIT_FILE)
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"{split_file}: missing; {root} is not a prepared energon dataset "
                                f"(run `tulip-mega data prepare {root}`)")
    doc = _load_yaml(split_file)
    parts = doc.get("split_parts") if isinstance(doc, dict) else None
    if not isinstance(parts, dict):
        raise ValueError(f"{split_file}: expected a mapping 'split_parts: {{train: [shard patterns]}}', got {doc!r}")
    if split_part not in parts:
        raise ValueError(f"{split_file}: key 'split_parts.{split_part}' is missing "
                         f"(split parts there: {sorted(parts)})")
    patterns = parts[split_part] or []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{split_file}: key 'split_parts.{split_part}' must be a list of shard name patterns, "
                         f"got {patterns!r}")
    excludes = doc.get("exclude") or []
    if not isinstance(excludes, list) or not all(isinstance(p, str) for p in excludes):
        raise ValueError(f"{split_file}: key 'exclude' must be a list of shard names, got {excludes!r}")
    excluded = {name for pattern in excludes for name in braceexpand.braceexpand(pattern)}
    per_sample = sorted(name for name in excluded if "/" in name and not name.endswith(".tar"))
    if per_sample:
        raise ValueError(f"{split_file}: key 'exclude' names single samples ({per_sample[:3]}), which is "
                         "unsupported: tulip-mega reads whole shards; exclude whole shards or rewrite them")
    names = [n for p in patterns for n in braceexpand.braceexpand(p) if n not in excluded]
    if not names:
        raise ValueError(f"{split_file}: key 'split_parts.{split_part}' lists no shards"
                         + (" (all excluded by 'exclude')" if patterns else ""))
    paths = [os.path.join(root, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{split_file}: key 'split_parts.{split_part}': {len(missing)} of {len(paths)} "
                                f"shards do not exist: {', '.join(missing[:3])}")
    return paths


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _entry(ref: Any, file: str, key: str, with_weight: bool) -> tuple[str, float]:
    """(absolute dataset folder, weight) of the dataset reference at ``key`` of ``file``."""
    if not isinstance(ref, dict) or "path" not in ref:
        raise ValueError(f"{file}: key '{key}': expected a mapping with 'path' (and 'weight' in a blend), got {ref!r}")
    allowed = {"path", "weight"} if with_weight else {"path"}
    for name in ref:
        if name not in allowed:
            what = f"energon's {name!r}" if name in _UNSUPPORTED_REF_KEYS else f"key {name!r}"
            raise ValueError(f"{file}: key '{key}.{name}': unsupported ({what} is not read by tulip-mega; "
                             f"supported here: {sorted(allowed)})")
    path = ref["path"]
    if not isinstance(path, str) or "://" in path:
        raise ValueError(f"{file}: key '{key}.path': expected a local folder path, got {path!r}")
    full = os.path.normpath(os.path.join(os.path.dirname(file), os.path.expanduser(path)))
    if os.path.isfile(full):
        raise ValueError(f"{file}: key '{key}.path': {full} is a file: nested metadatasets are unsupported, "
                         "name the energon dataset folders directly")
    if not is_energon_dataset(full):
        raise FileNotFoundError(f"{file}: key '{key}.path': {full} is not a prepared energon dataset folder "
                                f"(no {META_DIR}/{SPLIT_FILE}; run `tulip-mega data prepare {full}`)")
    weight = _number(ref.get("weight", 1.0), f"{file}: key '{key}.weight'") if with_weight else 1.0
    return full, weight


def read_metadataset(path: str, split_part: str = "train") -> list[BlendEntry]:
    """The datasets and weights of ``split_part`` in an energon MetadatasetV2 YAML.

    Accepted: ``__module__: megatron.energon``, ``__class__: MetadatasetV2``, and
    ``splits: {<part>: {blend: [{path, weight}, ...]}}`` or ``splits: {<part>: {path: ...}}``
    (weight 1). Paths are relative to the YAML's folder. A name is the folder's basename, made
    unique with ``-2``, ``-3``... Anything else energon can express (join, blend_epochized,
    subflavors, subset ranges, nested metadatasets) is a ValueError naming the file and key.
    """
    path = os.path.abspath(os.path.expanduser(path))
    doc = _load_yaml(path)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a MetadatasetV2 mapping, got {type(doc).__name__}")
    if doc.get("__module__") != "megatron.energon" or doc.get("__class__") != "MetadatasetV2":
        raise ValueError(f"{path}: keys '__module__'/'__class__' must be 'megatron.energon'/'MetadatasetV2', "
                         f"got {doc.get('__module__')!r}/{doc.get('__class__')!r} (only MetadatasetV2 is supported)")
    for key in doc:
        if key not in ("__module__", "__class__", "splits"):
            raise ValueError(f"{path}: key {key!r}: unsupported (expected only __module__, __class__, splits)")
    splits = doc.get("splits")
    if not isinstance(splits, dict) or split_part not in splits:
        have = sorted(splits) if isinstance(splits, dict) else splits
        raise ValueError(f"{path}: key 'splits.{split_part}' is missing (splits there: {have})")
    split, key = splits[split_part], f"splits.{split_part}"
    if not isinstance(split, dict):
        raise ValueError(f"{path}: key '{key}': expected a mapping with 'blend' or 'path', got {split!r}")
    if "blend" in split:
        for name in split:
            if name != "blend":
                raise ValueError(f"{path}: key '{key}.{name}': unsupported beside 'blend'")
        items = split["blend"]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: key '{key}.blend': expected a non-empty list of {{path, weight}}, got {items!r}")
        pairs = [_entry(item, path, f"{key}.blend[{i}]", with_weight=True) for i, item in enumerate(items)]
    elif "path" in split:
        pairs = [_entry(split, path, key, with_weight=False)]
    else:
        names = [n for n in split if n in ("join", "blend_epochized")] or sorted(map(str, split))
        raise ValueError(f"{path}: key '{key}.{names[0] if names else ''}': unsupported; tulip-mega reads a "
                         "'blend' of {path, weight} or a single 'path'")
    out: list[BlendEntry] = []
    seen: dict[str, int] = {}
    for full, weight in pairs:
        name = os.path.basename(full.rstrip(os.sep)) or "dataset"
        seen[name] = seen.get(name, 0) + 1
        out.append(BlendEntry(name if seen[name] == 1 else f"{name}-{seen[name]}", full, weight))
    return out
