"""Images/s of the DALI loader vs a PIL + torch DataLoader building the same views.

Both loaders run in this process, on the same shards, with the same number of CPU threads
(DALI: ``threads`` worker threads; PIL: that many DataLoader worker processes), and make the
same views per sample: view 0 (plain resize), G-1 global random-resized crops and n local
crops with flip, colour jitter, grayscale and blur, and the two GeCo edits. The DALI number
includes reading the tars and tokenising captions; the PIL baseline gets its samples already
in memory (a conservative comparison). Printed as a ratio; on a GPU machine (use_cuda()) the
DALI loader decodes with device="mixed" and a second line reports it.

    python benchmarks/loader.py --image-size 224 --samples 512 --threads 2
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataloaders.dali_loader import DaliLoader  # noqa: E402
from dataloaders.dali_pipeline import ViewPlan, rrc_window  # noqa: E402
from dataloaders.shards import expand_shards, iter_samples  # noqa: E402
from dataloaders.synthetic import write_shapes_dataset  # noqa: E402
from dataloaders.tokenizer import Tokenizer, train_tokenizer_from_shards  # noqa: E402


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
        out["crops"] = torch.stack([self._aug(img, rng, S, p.global_scale) for _ in range(p.crops)])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--global-crops", type=int, default=2)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        info = write_shapes_dataset(tmp, num_train=args.samples, num_val=16, samples_per_shard=128,
                                    image_size=args.image_size)
        tok = Tokenizer(train_tokenizer_from_shards(info["train_spec"], os.path.join(tmp, "tok")), 64)
        plan = ViewPlan(image_size=args.image_size, crops=args.global_crops - 1, local_crops=args.local_crops,
                        local_size=args.local_size, edits=True, global_scale=(0.4, 1.0))
        shards = expand_shards(info["train_spec"])
        dali_loader = DaliLoader(shards, args.batch_size, plan, tok, gpu=False, threads=args.threads, shuffle_buffer=64)
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
        print(f"views: {views}; batch {args.batch_size}; {args.threads} CPU threads each")
        print(f"DALI (cpu decode): {dali_ips:8.1f} img/s")
        print(f"PIL + DataLoader : {pil_ips:8.1f} img/s")
        print(f"ratio DALI / PIL : {dali_ips / pil_ips:8.2f}x")
        from tulip_mega.parallel.init import use_cuda

        if use_cuda():
            gpu = DaliLoader(shards, args.batch_size, plan, tok, gpu=True, threads=args.threads, shuffle_buffer=64)
            print(f"DALI (mixed)     : {measure(lambda: iter(gpu), args.batches, args.batch_size, 2):8.1f} img/s")


if __name__ == "__main__":
    main()
