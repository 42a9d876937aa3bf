"""`tulip-mega data prepare`: make a shard folder an energon dataset, and check it with our reader.

Why: energon's dataset folder (``.nv-meta/``: ``index.sqlite``, ``split.yaml``, ``dataset.yaml``,
``.info.json``) is the dataset description megatron tools share, so we write it with energon's
own ``energon prepare`` (run in-process, non-interactively, as a ``CrudeWebdataset`` with every
tar in the ``train`` split unless split parts are given). Training still reads the shards with
our reader (tulip_mega.data.shards), so the folder is then read once with *that* reader: what it
finds is printed (shards, samples, file extensions, samples without image or caption, damaged
shards and why) and its per-shard counts go to ``.nv-meta/tulip_counts.json`` (shard_counts),
which the data-parallel split uses instead of reading every shard at start-up.

What energon 7.4.1 does with a damaged shard (checked on shards cut at several offsets):

- cut at or inside a tar header: its indexer (tarfile) takes the cut for the archive's end and
  ``.info.json`` counts every sample with a file header before it, which is what our reader
  counts too (a partial last sample included);
- cut inside a file's data (or a shard with no sample): tarfile raises, energon logs "Shard
  failed to load ... Skipping it" with a count of 0, and then its aggregator fails the whole
  preparation (``AssertionError: Shard ... has no samples``), writing no split.yaml at all.

So shards that tarfile cannot list to the end, and empty ones, are left out of energon's
preparation (``--exclude``) and reported as such; their good samples are lost to energon-folder
training until the shard is rewritten. Their counts by our reader are still recorded.

energon also writes its binary tar index beside each shard as ``<shard>.idx``, the name of our
DALI index files (dali_index): prepare says how many it replaced; dp_split then uses the
recorded counts instead, and `data index` refuses to overwrite energon's files (--index-dir).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, TextIO

from tulip_mega.data.energon_meta import META_DIR, SPLIT_FILE, energon_shards
from tulip_mega.data.shard_counts import write_counts
from tulip_mega.data.shards import ShardReadError, iter_samples

__all__ = ["PrepareReport", "ShardScan", "find_tars", "prepare_dataset", "scan_shard"]

# What the loaders need of a sample (sample_stream's rule): the image file and a caption.
_IMAGE, _CAPTION = "jpg", "txt"


@dataclass
class ShardScan:
    """One shard as our reader found it."""

    name: str  # path relative to the dataset root
    samples: int  # samples iter_samples yielded (before any damage, a partial last one included)
    parts: Counter = field(default_factory=Counter)  # file extension -> samples that have it
    no_image: int = 0
    no_caption: int = 0
    damage: Optional[str] = None  # the ShardReadError message, None when intact


@dataclass
class PrepareReport:
    """What `data prepare` did and found."""

    root: str
    shards: list[ShardScan]
    split_parts: dict[str, int]  # energon split part -> shards in it
    left_out: dict[str, str]  # shard name -> why energon's preparation could not take it
    counts_file: str
    dali_indexes_replaced: int = 0  # our `data index` files energon overwrote with its own tar index

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def parts(self) -> Counter:
        return sum((s.parts for s in self.shards), Counter())

    @property
    def damaged(self) -> list[ShardScan]:
        return [s for s in self.shards if s.damage is not None]


def find_tars(root: str) -> list[str]:
    """Shard names relative to ``root`` as ``energon prepare`` finds them: every ``*.tar`` and
    ``*.tgz`` below it, sorted."""
    found = []
    for pattern in ("**/*.tar", "**/*.tgz"):
        found += [os.path.relpath(p, root) for p in glob.glob(os.path.join(glob.escape(root), pattern), recursive=True)
                  if os.path.isfile(p)]
    return sorted(n for n in found if not n.startswith(META_DIR + os.sep))


def scan_shard(root: str, name: str) -> ShardScan:
    """Read shard ``name`` once with iter_samples and count what is in it."""
    scan = ShardScan(name, 0)
    try:
        for sample in iter_samples(os.path.join(root, name)):
            scan.samples += 1
            scan.parts.update(k for k in sample if not k.startswith("__"))
            scan.no_image += _IMAGE not in sample
            scan.no_caption += not sample.get(_CAPTION, b"").strip()
    except ShardReadError as e:
        scan.damage = str(e)
    return scan


def _is_dali_index(shard: str) -> bool:
    """Whether ``<shard>.idx`` is a DALI index (``tulip-mega data index``, text starting ``v1``).

    energon's indexer writes its own binary tar index under that very name (``x.tar.idx``)."""
    try:
        with open(shard + ".idx", "rb") as f:
            return f.read(2) == b"v1"
    except OSError:
        return False


def _energon_refuses(path: str, scan: ShardScan) -> Optional[str]:
    """Why energon's preparation would fail on this shard (see the module doc), else None."""
    if scan.samples == 0:
        return "no samples (energon's prepare fails on an empty shard)"
    if scan.damage is None:
        return None
    try:  # what energon's indexer does: list every member with tarfile
        with tarfile.open(path, "r:*") as tar:
            for _ in tar:
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"tarfile cannot list it to the end ({e}); energon's prepare would fail on it"
    return None


def _run_energon(root: str, split_parts: list[str], exclude: list[str], num_workers: int, log: TextIO) -> None:
    """``energon prepare ROOT`` in-process, non-interactive, its output sent to ``log``."""
    import click
    from megatron.energon.tools.prepare import command

    args = [root, "--non-interactive", "--no-progress", "--force-overwrite", "--sample-type", "CrudeWebdataset",
            "--num-workers", str(num_workers)]
    for part in split_parts:
        args += ["--split-parts", part]
    if exclude:
        args += ["--exclude", "^(?:" + "|".join(re.escape(n) for n in exclude) + ")$"]
    try:
        with contextlib.redirect_stdout(log):
            command.main(args=args, prog_name="energon prepare", standalone_mode=False)
    except click.ClickException as e:
        raise RuntimeError(f"energon prepare {root} failed: {e.format_message()}") from e
    except (SystemExit, AssertionError) as e:
        raise RuntimeError(f"energon prepare {root} failed: {e!r} (its output is above)") from e


def prepare_dataset(root: str, split_parts: Optional[list[str]] = None, num_workers: int = 2,
                    log: Optional[TextIO] = None) -> PrepareReport:
    """Prepare ``root`` as an energon dataset, read it with our reader and record our counts.

    ``split_parts``: energon's ``NAME:PATTERN`` (a regex on shard names relative to ``root``,
    with ``{a..b}`` braces); default every shard in ``train``. ``log`` gets energon's own output
    (default stderr, so stdout stays ours). Raises FileNotFoundError for a folder without tars.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data prepare: {root} is not a folder (expected a folder of WebDataset .tar shards)")
    names = find_tars(root)
    if not names:
        raise FileNotFoundError(f"data prepare: {root} holds no .tar or .tgz shards (searched it and its "
                                "sub-folders); nothing to prepare")
    for part in split_parts or []:
        if ":" not in part or not part.split(":", 1)[0] or not part.split(":", 1)[1]:
            raise ValueError(f"data prepare: --split-parts {part!r}: expected NAME:PATTERN, e.g. 'train:train-.*'")
    scans = [scan_shard(root, n) for n in names]
    left_out = {s.name: why for s in scans if (why := _energon_refuses(os.path.join(root, s.name), s))}
    if len(left_out) == len(names):
        raise ValueError(f"data prepare: {root}: energon can index none of its {len(names)} shards: "
                         + "; ".join(f"{n}: {w}" for n, w in list(left_out.items())[:3]))
    parts = list(split_parts) if split_parts else ["train:.*"]
    dali = [n for n in names if _is_dali_index(os.path.join(root, n))]
    _run_energon(root, parts, sorted(left_out), num_workers, log if log is not None else sys.stderr)
    if not os.path.isfile(os.path.join(root, META_DIR, SPLIT_FILE)):
        raise RuntimeError(f"energon prepare {root} wrote no {META_DIR}/{SPLIT_FILE} (its output is above)")
    counts_file = write_counts(root, {os.path.join(root, s.name): (s.samples, s.damage) for s in scans})
    split_sizes = {}
    for part in parts:
        name = part.split(":", 1)[0]
        try:
            split_sizes[name] = len(energon_shards(root, name))
        except ValueError:  # a split part no shard matched
            split_sizes[name] = 0
    replaced = sum(not _is_dali_index(os.path.join(root, n)) for n in dali)
    return PrepareReport(root, scans, split_sizes, left_out, counts_file, replaced)
