"""Images/s of the DALI loader vs a PIL + torch DataLoader building the same views.

Both loaders run in this process, on the same shards, with the same number of CPU threads
(DALI: ``threads`` worker threads; PIL: that many DataLoader worker processes), and make the
same views per sample: view 0 (plain resize), G-1 global random-resized crops and n local
crops with flip, colour jitter, grayscale and blur, and the two GeCo edits. The DALI number
includes reading the tars and tokenising captions; the PIL baseline gets its samples already
in memory (a conservative comparison). Printed as a ratio; on a GPU machine (use_cuda()) the
DALI loader decodes with device="mixed" and a second line reports it.

    python benchmarks/loader.py --image-size 224 --samples 512 --threads 2

``--host-only`` times the DALI loader's host path alone (tar read, shuffle, JSON, JPEG header,
view parameters, EDA, tokenising; no decode) for the plain SigLIP, clip-rocket and full TULIP
sample sets with 0 (in the loader thread), 1 and 2 reader worker processes, all in one run:
samples/s per rank, samples per CPU-second (loader + workers: the "host rate" that
``tulip-mega plan --host-samples-per-core`` takes), the ratios to the same run's 0- and 1-worker
figures, and the CPU microseconds per sample of the loader process and of the workers (of the
fastest round). It ends with the machine's own ceiling for a second worker (``machine_ceiling``):
a worker's work in 2 independent processes over 1, which no loader can beat.

    python benchmarks/loader.py --host-only

A worker's first message (up to ``reader_pool.READ_CHUNK`` = 1024 samples, or a shard if
smaller) is prepared before the first result arrives, outside the timed window, yet its samples
are counted: with W workers the figures run high by W messages over the window. ``--host-only``
therefore refuses fewer than 20 x W messages' worth of samples (that bias at most 5%), and its
defaults (``--samples`` = that minimum for the largest ``--workers`` count, 40,960 for "0,1,2";
``--samples-per-shard 1024``, messages as large as on real shards; ``--image-size 32``) meet it.
At 512 samples (the old default) 2 workers printed "10x" over 0 and 0 us of worker CPU: the
workers had finished the whole window before it began. End to end, ``--samples`` must cover
the warm-up (``--threads`` + 1 batches) and ``--batches`` batches of ``--batch-size``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import multiprocessing as mp
import os
import pickle
import resource
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tulip_mega.data.dali_loader import DaliLoader  # noqa: E402
from tulip_mega.data.dali_pipeline import ViewPlan, rrc_window  # noqa: E402
from tulip_mega.data.host_prep import HostPrep  # noqa: E402
from tulip_mega.data.reader_pool import READ_CHUNK, _read  # noqa: E402
from tulip_mega.data.shards import expand_shards, iter_samples  # noqa: E402
from tulip_mega.datagen.synthetic import write_shapes_dataset  # noqa: E402
from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer_from_shards  # noqa: E402


class PilViews(torch.utils.data.Dataset):
    """The same views with PIL (torchvision-style ops written out; torchvision is not a dependency)."""

    def __init__(self, samples: list[dict], plan: ViewPlan) -> None:
        self.samples, self.plan = samples, plan

    def __len__(self) -> int:
        return len(self.samples)

    def _aug(self, img: Image.Image, rng: np.random.Generator, size: int, scale) -> torch.Tensor:
        p = self.plan
        top, left, h, w = rrc_window(rng, img.width, img.height, scale)
        out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < p.flip_prob:
            out = ImageOps.mirror(out)
        if rng.random() < p.color_jitter_prob:
            b, c, s, hue = p.color_jitter
            out = ImageEnhance.Brightness(out).enhance(rng.uniform(1 - b, 1 + b))
            out = ImageEnhance.Contrast(out).enhance(rng.uniform(1 - c, 1 + c))
            out = ImageEnhance.Color(out).enhance(rng.uniform(1 - s, 1 + s))
            hsv = np.asarray(out.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.uniform(-hue, hue) * 255)) % 256
            out = Image.fromarray(hsv, "HSV").convert("RGB")
        if rng.random() < p.grayscale_prob:
            out = ImageOps.grayscale(out).convert("RGB")
        if rng.random() < p.blur_prob:
            out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0) * size / 224))
        return self._tensor(out)

    @staticmethod
    def _tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p, s = self.plan, self.samples[i]
        rng = np.random.default_rng(i)
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        S = p.image_size
        out = {"images": self._tensor(img.resize((S, S), Image.Resampling.BILINEAR))}
        if p.crops:  # torch.stack refuses an empty list (--global-crops 1 / --local-crops 0)
            out["crops"] = torch.stack([self._aug(img, rng, S, p.global_scale) for _ in range(p.crops)])
        if p.local_crops:
            out["local_crops"] = torch.stack([self._aug(img, rng, p.local_size, p.local_scale)
                                              for _ in range(p.local_crops)])
        edits = [Image.open(io.BytesIO(s[k])).convert("RGB").resize((S, S), Image.Resampling.BILINEAR)
                 for k in ("pos.jpg", "neg.jpg")]
        out["edits"] = torch.stack([self._tensor(e) for e in edits])
        return out


def measure(make, batches: int, batch_size: int, warmup: int) -> float:
    """img/s of a fresh iterator from ``make()`` after one warm-up batch; the iterator (and its
    worker processes / prefetch thread) is shut down before returning, so the two loaders never
    run at the same time (persistent PIL workers would otherwise keep prefetching during the
    DALI measurement and both numbers would be wrong)."""
    it = make()
    for _ in range(warmup):  # pipeline build / worker start, and drain what was read ahead meanwhile
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    ips = batches * batch_size / (time.perf_counter() - t)
    close = getattr(it, "close", None) or getattr(it, "_shutdown_workers", None)
    if close is not None:
        close()
    return ips


SAMPLE_SETS = {  # what each recipe family asks of the host per sample (shapes set, 32 px)
    "siglip": dict(),
    "clip_rocket": dict(crops=1, first_view_crop=True, eda=True),
    "tulip": dict(crops=1, local_crops=8, local_size=16, edits=True, paraphrases=2, negatives=2),
}


def _cpu_seconds(dl: DaliLoader) -> tuple[float, float]:
    """CPU time of this process (the loader thread and its helpers) and of its reader workers
    (not its children under forkserver, so read from /proc)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime, (dl._pool.cpu_seconds() if dl._pool is not None else 0.0)


def host_rate(shards: list[str], tok: Tokenizer, plan: ViewPlan, workers: int, samples: int,
              batch_size: int) -> tuple[float, float, float, float]:
    """(samples/s, samples per CPU-second, loader-process and worker CPU microseconds per
    sample) of ``DaliLoader.host_stream``: every host result, no decode. Timed from the first
    result to the last of the first epoch (`samples` is the epoch's size): worker start-up and the
    next epoch's start are left out. That start waits for each worker's first message of the new
    epoch (~70 ms at 1024 samples per message: ~10% of a 16k-sample window, nothing over a real
    epoch); CPU time is this process's plus the workers'."""
    dl = DaliLoader(shards, batch_size, plan, tok, gpu=False, shuffle_buffer=256, reader_workers=workers)
    stream = dl.host_stream()
    next(stream)
    (me, pool), t = _cpu_seconds(dl), time.perf_counter()
    n = sum(1 for (_, _, item), _ in itertools.islice(stream, samples - 1) if item is not None)
    wall = time.perf_counter() - t
    me_end, pool_end = _cpu_seconds(dl)
    stream.close()
    me, pool = me_end - me, pool_end - pool
    return n / wall, n / (me + pool), me / n * 1e6, pool / n * 1e6


class _PickleSink:
    """Stands in for a reader worker's result queue: pickles each message as the queue would."""

    def put(self, msg, timeout=None) -> None:  # noqa: ARG002 - the queue's signature
        pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def _worker_work(prep: HostPrep, shards: list[str]) -> None:
    """A reader worker's whole job on `shards` (``reader_pool._read``: read, inspect, tokenise,
    pack, pickle), with no loader to feed."""
    for shard in shards:
        _read(prep, shard, READ_CHUNK, _PickleSink(), os.getpid())


def machine_ceiling(prep: HostPrep, shards: list[str], samples: int, rounds: int) -> float:
    """What a second worker can add on this machine at best: the rate of the workers' own work
    (``_worker_work``) in 2 independent processes over 1, best of `rounds`, with no loader thread,
    no queues and no shared state. CPUs that slow each other down (shared caches, hypervisor)
    show up here as a figure below 2x; the 2-vs-1-worker loader figure cannot exceed it."""
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    best = {}
    with ctx.Pool(2) as pool:
        pool.map(abs, range(2))  # both processes started before any timing
        for _ in range(rounds):
            for procs in (1, 2):
                t = time.perf_counter()
                pool.starmap(_worker_work, [(prep, shards)] * procs)
                best[procs] = max(best.get(procs, 0.0), procs * samples / (time.perf_counter() - t))
    return best[2] / best[1]


def host_only(args: argparse.Namespace, shards: list[str], tok: Tokenizer) -> None:
    workers = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()
    print(f"host path only (no decode), {args.samples} samples per figure, best of {args.rounds}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    print(f"{'sample set':<12} {'workers':>7} {'samples/s':>10} {'per CPU-s':>10} {'vs 0 workers':>13} "
          f"{'vs 1 worker':>12} {'loader us':>10} {'workers us':>11}")
    for name, extra in SAMPLE_SETS.items():
        plan = ViewPlan(image_size=args.image_size, **extra)
        best: dict[int, tuple[float, float, float, float]] = {}
        for _ in range(args.rounds):  # alternate the worker counts: load hits them alike
            for w in workers:
                got = host_rate(shards, tok, plan, w, args.samples, args.batch_size)
                if got[0] > best.get(w, (0.0,))[0]:
                    best[w] = got
        base = best[workers[0]][0]
        one = best[1][0] if 1 in best else None
        for w in workers:
            rate, per_cpu, me_us, pool_us = best[w]
            vs_one = f"{rate / one:>11.2f}x" if one and w >= 1 else f"{'':>12}"
            print(f"{name:<12} {w:>7} {rate:>10.0f} {per_cpu:>10.0f} {rate / base:>12.2f}x {vs_one} "
                  f"{me_us:>10.1f} {pool_us:>11.1f}")
    ceiling = machine_ceiling(HostPrep(ViewPlan(image_size=args.image_size), tok, 0, 0), shards, args.samples,
                              args.rounds)
    print(f"machine ceiling for 2 workers (a worker's own work, siglip set, in 2 independent processes over 1, "
          f"no loader): {ceiling:.2f}x")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


# The first messages of the workers may be at most this fraction of a --host-only window.
FIRST_MESSAGE_SHARE = 0.05


def min_host_samples(workers: list[int], samples_per_shard: int, batch_size: int) -> int:
    """Fewest samples per --host-only figure: every worker's first message (up to READ_CHUNK
    samples, at most one shard) within FIRST_MESSAGE_SHARE of the window, and two batches."""
    message = min(READ_CHUNK, samples_per_shard)
    return max(round(max(workers) * message / FIRST_MESSAGE_SHARE), 2 * batch_size)


def min_end_to_end_samples(batches: int, batch_size: int, threads: int) -> int:
    """Fewest samples for the end-to-end timing: `measure`'s warm-up (threads + 1 batches) and
    `batches` timed batches, per loader and epoch (the PIL DataLoader stops at its epoch end)."""
    return (batches + threads + 1) * batch_size


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Mode-dependent defaults (see the module docstring); too few samples exits with the minimum."""
    host = args.host_only
    if args.image_size is None:
        args.image_size = 32 if host else 224
    if args.samples_per_shard is None:
        args.samples_per_shard = READ_CHUNK if host else 128
    if host:
        workers = [int(w) for w in args.workers.split(",")]
        least = min_host_samples(workers, args.samples_per_shard, args.batch_size)
        why = (f"with --workers {args.workers} each worker's first message of up to "
               f"{min(READ_CHUNK, args.samples_per_shard)} samples (READ_CHUNK, or --samples-per-shard if smaller) "
               f"is prepared before the timing starts and must be at most {FIRST_MESSAGE_SHARE:.0%} of the window")
    else:
        least = min_end_to_end_samples(args.batches, args.batch_size, args.threads)
        why = (f"each loader runs {args.threads + 1} warm-up batches (--threads {args.threads} + 1) and --batches "
               f"{args.batches} timed ones of --batch-size {args.batch_size} within one epoch")
    if args.samples is None:
        args.samples = least if host else max(512, least)
    if args.samples < least:
        raise SystemExit(f"loader.py: --samples {args.samples} is too few: at least {least} ({why})")
    return args


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=None, help="default: 224; 32 with --host-only")
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--global-crops", type=int, default=2)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--samples", type=int, default=None,
                    help="samples in the dataset (one epoch); default: 512, or with --host-only the fewest it "
                         "accepts (see above)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples-per-shard", type=int, default=None, help="default: 128; 1024 with --host-only")
    ap.add_argument("--host-only", action="store_true", help="time the host path alone (see above)")
    ap.add_argument("--workers", default="0,1,2", help="reader worker counts for --host-only (first = baseline)")
    ap.add_argument("--reader-workers", type=int, default=0, help="reader workers of the DALI loader (end to end)")
    return ap


def main(argv: Optional[list[str]] = None) -> None:
    args = resolve_args(build_parser().parse_args(argv))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        info = write_shapes_dataset(tmp, num_train=args.samples, num_val=16, samples_per_shard=args.samples_per_shard,
                                    image_size=args.image_size)
        # 16k captions train the 1k vocabulary as well as all of them (the --host-only default has 40k).
        tok = Tokenizer(train_tokenizer_from_shards(info["train_spec"], os.path.join(tmp, "tok"), max_texts=16384), 64)
        plan = ViewPlan(image_size=args.image_size, crops=args.global_crops - 1, local_crops=args.local_crops,
                        local_size=args.local_size, edits=True, global_scale=(0.4, 1.0))
        shards = expand_shards(info["train_spec"])
        if args.host_only:
            host_only(args, shards, tok)
            return
        dali_loader = DaliLoader(shards, args.batch_size, plan, tok, gpu=False, threads=args.threads, shuffle_buffer=64,
                                 reader_workers=args.reader_workers)
        samples = [s for sh in shards for s in iter_samples(sh)]
        dl = torch.utils.data.DataLoader(PilViews(samples, plan), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.threads, drop_last=True)

        def dali():
            return iter(dali_loader)

        def pil():
            return iter(dl)
        # Alternate the two (best of --rounds each): a shared machine's load hits both alike.
        dali_ips = pil_ips = 0.0
        for _ in range(args.rounds):
            dali_ips = max(dali_ips, measure(dali, args.batches, args.batch_size, args.threads + 1))
            pil_ips = max(pil_ips, measure(pil, args.batches, args.batch_size, args.threads + 1))
        views = f"{args.global_crops} global @{args.image_size} + {args.local_crops} local @{args.local_size} + 2 edits"
        print(f"views: {views}; batch {args.batch_size}; {args.threads} CPU threads each; "
              f"DALI reader workers {args.reader_workers}; load average {os.getloadavg()[0]:.2f}")
        print(f"DALI (cpu decode): {dali_ips:8.1f} img/s")
        print(f"PIL + DataLoader : {pil_ips:8.1f} img/s")
        print(f"ratio DALI / PIL : {dali_ips / pil_ips:8.2f}x")
        from tulip_mega.parallel.init import use_cuda

        if use_cuda():
            gpu = DaliLoader(shards, args.batch_size, plan, tok, gpu=True, threads=args.threads, shuffle_buffer=64)
            print(f"DALI (mixed)     : {measure(lambda: iter(gpu), args.batches, args.batch_size, 2):8.1f} img/s")


if __name__ == "__main__":
    main()
