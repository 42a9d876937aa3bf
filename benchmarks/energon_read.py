"""megatron-energon's sample read vs ours, CPU microseconds per sample, in one run on the same shards.

Why: issue #26 asks to move the host side of loading onto energon, keeping ours wherever energon
cannot come within 20% of today's host rate. This measures that, in one process (energon with
``num_workers=0``: its in-process path, no worker processes to add up), on the quickstart's
shapes shards (32 px, 1024 samples per shard), prepared once with ``tulip-mega data prepare``:

- raw read: energon (``get_train_dataset`` of the prepared folder as a ``CrudeWebdataset``, a
  stateless pass-through Cooker, no decoder, no shuffle buffer, ``get_savable_loader`` with
  ``gc_collect_every_n_steps=0`` and no watchdog) vs ``shards.iter_samples`` over the same tars;
- read + our per-sample host work (``HostPrep.record``: caption and JSON checks, JPEG header,
  tokenising) for the siglip, clip_rocket and tulip sample sets of benchmarks/loader.py, with
  energon's reader and with ours, and our whole in-thread host path (``DaliLoader.host_stream``
  with 0 reader workers: read, shuffle, record, view parameters) as today's reference.

Figures are CPU time of this process (all its threads) per sample, best of ``--rounds``; the
machine is shared, so compare ratios within one run. Default run: under 2 minutes.

    python benchmarks/energon_read.py [--samples 8192] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from loader import SAMPLE_SETS, host_rate  # noqa: E402
from tulip_mega.data.dali_pipeline import ViewPlan  # noqa: E402
from tulip_mega.data.energon_prepare import prepare_dataset  # noqa: E402
from tulip_mega.data.host_prep import HostPrep  # noqa: E402
from tulip_mega.data.shards import expand_shards, iter_samples  # noqa: E402
from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer_from_shards  # noqa: E402
from tulip_mega.datagen.synthetic import write_shapes_dataset  # noqa: E402

CHUNK = 1024  # samples per HostPrep.record call (a reader worker's message, reader_pool.READ_CHUNK)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def energon_samples(root: str) -> Iterator[dict[str, Any]]:
    """One epoch of ``root``'s train split as energon's raw sample dicts (bytes per part)."""
    from megatron.energon import (Cooker, DefaultTaskEncoder, WorkerConfig, get_savable_loader,
                                  get_train_dataset, stateless)

    @stateless
    def cook(sample: dict) -> dict:
        return sample

    class Raw(DefaultTaskEncoder):
        decoder = None
        cookers = [Cooker(cook)]

        def encode_sample(self, sample: dict) -> dict:
            return sample

        def batch(self, samples: list) -> list:
            return samples

    ds = get_train_dataset(root, worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0), batch_size=None,
                           shuffle_buffer_size=None, max_samples_per_sequence=None, task_encoder=Raw(), repeat=False)
    yield from get_savable_loader(ds, gc_collect_every_n_steps=0, watchdog_timeout_seconds=None)


def our_samples(shards: list[str]) -> Iterator[dict[str, Any]]:
    for shard in shards:
        yield from iter_samples(shard)


def _chunks(items: Iterable[dict], n: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def us_per_sample(run: Callable[[], int], expect: int) -> float:
    """CPU microseconds per sample of ``run`` (which returns the samples it handled)."""
    t = _cpu()
    n = run()
    spent = _cpu() - t
    if n != expect:
        raise SystemExit(f"energon_read.py: a pass handled {n} samples, expected {expect}")
    return spent / n * 1e6


def read_only(samples: Callable[[], Iterable[dict]]) -> Callable[[], int]:
    return lambda: sum(1 for _ in samples())


def read_and_record(samples: Callable[[], Iterable[dict]], prep: HostPrep) -> Callable[[], int]:
    def run() -> int:
        n = 0
        for chunk in _chunks(samples(), CHUNK):
            recs = prep.record([{**s, "__shard__": s.get("__shard__", "")} for s in chunk])
            n += sum(1 for r in recs if r is not None)
        return n
    return run


def measure(root: str, shards: list[str], tok: Tokenizer, image_size: int, samples: int, rounds: int,
            batch_size: int) -> dict[str, dict[str, float]]:
    """Best-of-rounds CPU-us/sample per (sample set or 'raw') and path."""
    best: dict[str, dict[str, float]] = {}

    def keep(row: str, col: str, value: float) -> None:
        best.setdefault(row, {})
        best[row][col] = min(best[row].get(col, float("inf")), value)

    for _ in range(rounds):  # alternate everything within a round: load hits all alike
        keep("raw read", "energon", us_per_sample(read_only(lambda: energon_samples(root)), samples))
        keep("raw read", "ours", us_per_sample(read_only(lambda: our_samples(shards)), samples))
        for name, extra in SAMPLE_SETS.items():
            plan = ViewPlan(image_size=image_size, **extra)
            prep = HostPrep(plan, tok, 0, 0)
            keep(name, "energon", us_per_sample(read_and_record(lambda: energon_samples(root), prep), samples))
            keep(name, "ours", us_per_sample(read_and_record(lambda: our_samples(shards), prep), samples))
            _, _, loader_us, _ = host_rate(shards, tok, plan, 0, samples, batch_size)
            keep(name, "host path", loader_us)
    return best


def table(best: dict[str, dict[str, float]]) -> str:
    out = [f"{'what':<27} {'energon us':>10} {'ours us':>8} {'energon/ours':>13} {'our host path us':>17} "
           f"{'energon/host path':>18}"]
    for row, cols in best.items():
        what = row if row == "raw read" else f"{row}: read + record"
        host = cols.get("host path")
        tail = f"{host:>17.1f} {cols['energon'] / host:>17.2f}x" if host else f"{'':>17} {'':>18}"
        out.append(f"{what:<27} {cols['energon']:>10.1f} {cols['ours']:>8.1f} {cols['energon'] / cols['ours']:>12.2f}x "
                   f"{tail}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8192, help="train samples (one epoch per figure)")
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # energon's DataLoader, on a CPU machine
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "shapes")
        info = write_shapes_dataset(root, num_train=args.samples, num_val=16, samples_per_shard=args.samples_per_shard,
                                    image_size=args.image_size)
        prepare_dataset(root, ["train:train-.*", "val:val-.*"], num_workers=2, log=io.StringIO())
        shards = expand_shards(root)
        assert shards == expand_shards(info["train_spec"]), "the energon split is not the train shards"
        tok = Tokenizer(train_tokenizer_from_shards(shards, os.path.join(tmp, "tok"), max_texts=8192), 64)
        load = os.getloadavg()
        print(f"{args.samples} samples ({len(shards)} shards, {args.image_size} px), CPU us per sample of this "
              f"process, best of {args.rounds}; {os.cpu_count()} CPUs, load average {load[0]:.2f}")
        print(table(measure(root, shards, tok, args.image_size, args.samples, args.rounds, args.batch_size)))
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f}")


if __name__ == "__main__":
    main()
