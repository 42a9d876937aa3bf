"""Launch settings slurm/common.sh derives from a run's resolved recipe (the JSON `tulip-mega
config` prints): container mounts and the OpenMP thread count per task.

Standard library only, run with the batch node's python3 (which need not have the trainer's
packages when the tasks run in a container):

    python3 -m tulip_mega.slurm_launch mounts CONFIG_JSON --base REPO [--always DIR ...]
    python3 -m tulip_mega.slurm_launch omp-threads CONFIG_JSON --cpus-per-task N

`mounts` prints pyxis's `--container-mounts` value (used when CONTAINER_IMAGE is set and
CONTAINER_MOUNTS is not): every host folder the run needs, each mounted at its own path
(`/data/x:/data/x`), so the recipe's paths mean the same inside the container. Which folder a
recipe key needs (`PATH_KEYS`):

- shard specs (data.train_shards, data.mixture[i].shards, eval.*_shards): per comma-separated
  part, the folder above the first brace range or glob character (`/data/x/{000..099}.tar` ->
  `/data/x`), or the folder itself, or a plain shard file's folder (DALI writes its `.idx` files
  beside shards); object-store URLs need no mount; an energon blend YAML: its folder and each
  dataset folder it names;
- files (data.tokenizer, eval.classes, eval.linear_probe_classes): their folder;
- folders (checkpoint.load, model.init_from_hf, model.init_from_open_clip, and the written
  checkpoint.dir and run.output_dir): themselves; written ones are created when missing (pyxis
  refuses a mount whose source does not exist).

Relative paths are taken from `--base` (the repository: the container's working folder).
Folders inside another listed folder (the repository first) are dropped, duplicates too. An
input that does not exist on this node is left out with a note on stderr (it may live inside
the image).

`omp-threads` prints OMP_NUM_THREADS for one task (see `omp_threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Iterable, Optional, Sequence

# (recipe key, kind): kind "shards" = a shard spec, "file" = one file, "dir" = a folder the run
# reads, "outdir" = a folder the run writes (created when missing).
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("data.train_shards", "shards"),
    ("data.tokenizer", "file"),
    ("eval.zeroshot_shards", "shards"),
    ("eval.classes", "file"),
    ("eval.retrieval_shards", "shards"),
    ("eval.linear_probe_shards", "shards"),
    ("eval.linear_probe_val_shards", "shards"),
    ("eval.linear_probe_classes", "file"),
    ("checkpoint.load", "dir"),
    ("model.init_from_hf", "dir"),
    ("model.init_from_open_clip", "dir"),
    ("checkpoint.dir", "outdir"),
    ("run.output_dir", "outdir"),
)

_PATTERN = re.compile(r"[{*?\[]")  # where a brace range or glob starts


def _lookup(config: dict, key: str) -> Optional[str]:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, str) and node.strip() else None


def _split_spec(spec: str) -> list[str]:
    """A shard spec's comma-separated parts (commas inside braces belong to the part), as
    tulip_mega.data.shards.expand_shards splits it."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}" and depth > 0
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _absolute(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def folders_for(kind: str, value: str, base: str) -> list[str]:
    """The host folders one recipe value needs mounted (absolute, not yet checked to exist)."""
    if kind == "shards":
        out = []
        if value.strip().endswith((".yaml", ".yml")) and os.path.isfile(_absolute(value.strip(), base)):
            # An energon MetadatasetV2 blend: its own folder and each dataset folder it names.
            from tulip_mega.data.energon_meta import read_metadataset

            blend = _absolute(value.strip(), base)
            return [os.path.dirname(blend)] + [entry.path for entry in read_metadataset(blend, "train")]
        for part in _split_spec(value):
            if "://" in part:  # an object-store URL: nothing to mount
                continue
            m = _PATTERN.search(part)
            if m:  # the folder above the first pattern character
                out.append(os.path.dirname(_absolute(part[:m.start()] + "x", base)))
            else:
                path = _absolute(part, base)
                out.append(path if os.path.isdir(path) else os.path.dirname(path))
        return out
    if kind == "file":
        return [os.path.dirname(_absolute(value, base))]
    return [_absolute(value, base)]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def mount_folders(config: dict, base: str, always: Iterable[str] = (),
                  notes: Optional[list[str]] = None) -> list[str]:
    """The folders to mount for `config` (the JSON `tulip-mega config` prints): `always` first
    (e.g. the repository), then each PATH_KEYS folder that exists on this node and is not inside
    one already listed. Missing output folders are created; missing inputs are noted and left out."""
    wanted: list[tuple[str, str]] = [("(always)", _absolute(a, base)) for a in always]
    for key, kind in PATH_KEYS:
        value = _lookup(config, key)
        if value is not None:
            wanted.extend((key, folder) for folder in folders_for(kind, value, base))
    for i, entry in enumerate((config.get("data") or {}).get("mixture") or []):  # data.mixture[i].shards
        if isinstance(entry, dict) and isinstance(entry.get("shards"), str):
            wanted.extend((f"data.mixture[{i}].shards", folder)
                          for folder in folders_for("shards", entry["shards"], base))
    out: list[str] = []
    for key, folder in wanted:
        if any(_inside(folder, m) for m in out):
            continue
        if not os.path.isdir(folder):
            if dict(PATH_KEYS).get(key) == "outdir":
                os.makedirs(folder, exist_ok=True)
            else:
                if notes is not None:
                    notes.append(f"{key}: folder {folder} does not exist on this node; not mounted "
                                 "(it must then exist inside the image)")
                continue
        out = [m for m in out if not _inside(m, folder)] + [folder]
    return out


def container_mounts(folders: Sequence[str]) -> str:
    """pyxis --container-mounts: each folder at its own path, comma-separated."""
    bad = [f for f in folders if "," in f or ":" in f]
    if bad:
        raise ValueError(f"cannot mount {bad}: pyxis --container-mounts separates entries with ',' and ':'; "
                         "set CONTAINER_MOUNTS by hand")
    return ",".join(f"{f}:{f}" for f in folders)


def omp_threads(config: dict, cpus_per_task: int) -> int:
    """OpenMP threads for one rank: the task's cores minus what the rank's other threads and
    processes keep busy, at least 1. Those are the training thread, DALI's CPU threads
    (data.threads), the reader worker processes (data.reader_workers, one thread each) and the
    loader's prefetch thread (data.prefetch > 0). More OpenMP threads than the cores left would
    spin against the loader's threads; torch's CPU ops on a GPU rank are small either way."""
    data = config.get("data", {})
    busy = 1 + int(data.get("threads", 0)) + int(data.get("reader_workers", 0)) + (int(data.get("prefetch", 0)) > 0)
    return max(1, cpus_per_task - busy)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m tulip_mega.slurm_launch",
                                description="launch settings for slurm/common.sh from a resolved recipe")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mounts", help="pyxis --container-mounts for the run's folders")
    m.add_argument("config_json", help="the output of `tulip-mega config RECIPE [overrides]`")
    m.add_argument("--base", required=True, help="folder relative recipe paths start from (the repository)")
    m.add_argument("--always", action="append", default=[], help="a folder to mount in any case (repeatable)")
    o = sub.add_parser("omp-threads", help="OMP_NUM_THREADS for one task")
    o.add_argument("config_json", help="the output of `tulip-mega config RECIPE [overrides]`")
    o.add_argument("--cpus-per-task", type=int, required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        with open(args.config_json) as f:
            config = json.load(f)
        notes: list[str] = []
        if args.command == "mounts":
            out = container_mounts(mount_folders(config, args.base, args.always, notes))
        else:
            out = str(omp_threads(config, args.cpus_per_task))
    except (OSError, ValueError) as e:
        print(f"tulip_mega.slurm_launch: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"tulip_mega.slurm_launch: {note}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
