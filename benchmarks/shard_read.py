"""Raw tar read speed: microseconds per sample of ``shards.iter_samples`` (best of N rounds),
and its ratio to the tarfile reader (``shards._iter_tarfile``) timed in the same run.

The lean reader is the loader's hot loop (every sample of every epoch, and every replayed one
on resume); this times it alone on the quickstart's shapes shards, written once into ``--dir``.
Rounds of the two readers alternate, so a busy machine slows both alike.

    python benchmarks/shard_read.py --dir /tmp/shapes_bench --rounds 5
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tulip_mega.data.shards import _iter_tarfile, iter_samples  # noqa: E402
from tulip_mega.datagen.synthetic import write_shapes_dataset  # noqa: E402


def time_read(paths: list[str], offsets: bool, reader=iter_samples) -> tuple[float, int]:
    """(seconds, samples) for one pass of ``reader`` over ``paths``."""
    n = 0
    t = time.perf_counter()
    for path in paths:
        for _ in reader(path, offsets):
            n += 1
    return time.perf_counter() - t, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/shapes_bench", help="where the shapes shards are (written if absent)")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the shards; the best one is reported")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.dir, "train-*.tar")))
    if not paths:
        write_shapes_dataset(args.dir)
        paths = sorted(glob.glob(os.path.join(args.dir, "train-*.tar")))
    for offsets in (False, True):
        lean, tar = [], []
        for _ in range(args.rounds):
            lean.append(time_read(paths, offsets))
            tar.append(time_read(paths, offsets, _iter_tarfile))
        (best, n), (base, _) = min(lean), min(tar)
        print(f"offsets={offsets}: {1e6 * best / n:.1f} us/sample, tarfile {1e6 * base / n:.1f} us/sample, "
              f"ratio {best / base:.2f} (best of {args.rounds}, {n} samples)")


if __name__ == "__main__":
    main()
