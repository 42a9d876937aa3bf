"""Per-stage forward+backward time of `parallel.pipeline_split=balanced` vs `even` on CPU.

Why: the balanced split (tulip_mega/models/pipeline_split.py) places both towers' layers so
that the slowest pipeline stage is as fast as possible, by FLOPs; this checks on real
megatron stages that the measured stage times follow, beside `plan`'s prediction (max/min
stage FLOPs, tulip_mega/plan_stages.compare_splits) for the same splits.

How: 4 gloo processes (PP=4, TP=1), an uneven tower pair (default: vision 10 layers over 64
patches, text 3 layers over 16 tokens, width 192). Each rank builds its stage of the model
under each split and times forward+backward of that stage alone, on random inputs of its
packed p2p shape (the first stage on images and tokens; the last stage backpropagates a
random gradient of the embeddings), so no p2p wait is in the number. Ranks take turns (one
times, the others wait at a barrier) and the splits alternate rep by rep, so the 2-core
machine's drift and the ranks' competition for cores hit both splits alike. The median of
`--reps` is reported per stage, then max/min over stages for each split.

  python benchmarks/pipeline_split.py                 # ~1-2 minutes on 2 cores
  python benchmarks/pipeline_split.py --vision-layers 12 --text-layers 2 --reps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for `python benchmarks/...`
warnings.filterwarnings("ignore")

SPLITS = ("even", "balanced")


def overrides(args) -> list[str]:
    return [
        "model.size=debug", f"model.vision.image_size={args.image_size}", "model.vision.patch_size=16",
        f"model.vision.num_layers={args.vision_layers}", f"model.text.num_layers={args.text_layers}",
        f"model.text.context_length={args.text_tokens}",
        *(f"model.{t}.{k}={v}" for t in ("vision", "text")
          for k, v in (("hidden_size", args.width), ("num_heads", 4), ("ffn_hidden_size", 4 * args.width))),
        "parallel.pipeline_parallel=4", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}", "loss.contrastive_batch=micro",
    ]


def _stage_step(model, cfg, shape, images, tokens):
    """One forward+backward of this rank's stage alone."""
    import torch

    if not model.pre_process:
        received = torch.randn(shape, requires_grad=True)
        model.set_input_tensor(received)
    out = model(images, tokens, streams=model.train_streams)
    if model.post_process:
        loss = (out.image_emb * torch.ones_like(out.image_emb)).sum() + out.text_emb.sum()
        loss.backward()
    else:
        out.backward(torch.randn_like(out))
    model.zero_grad(set_to_none=True)


def worker(args) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from tulip_mega.config import load_config
    from tulip_mega.launch import resolve_layout
    from tulip_mega.models.build import build_model
    from tulip_mega.parallel.init import init_parallel

    torch.set_num_threads(1)
    base = overrides(args)
    cfgs = {name: load_config(None, base + [f"parallel.pipeline_split={name}"]) for name in SPLITS}
    init_parallel(1, 4, 0)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    layouts = {name: resolve_layout(cfg, 4) for name, cfg in cfgs.items()}
    models = {name: build_model(cfg, layouts[name]) for name, cfg in cfgs.items()}
    b = args.micro_batch
    images = torch.randn(b, 3, args.image_size, args.image_size)
    tokens = torch.randint(3, 200, (b, args.text_tokens))
    shapes = {name: m.packed_shape(b, m.train_streams) for name, m in models.items()}
    times = {name: [] for name in SPLITS}
    for rep in range(args.warmup + args.reps):
        for turn in range(4):
            for name in (SPLITS if rep % 2 == 0 else SPLITS[::-1]):
                dist.barrier()
                if turn != rank:
                    continue
                t = time.perf_counter()
                _stage_step(models[name], cfgs[name], shapes[name], images, tokens)
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - t)
    dist.barrier()
    return {"rank": rank, "median": {n: statistics.median(v) for n, v in times.items()},
            "split": {n: layout.split[rank] for n, layout in layouts.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vision-layers", type=int, default=10)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--text-tokens", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)

    from tulip_mega.config import load_config
    from tulip_mega.launch import resolve_layout
    from tulip_mega.models.pipeline_split import stage_costs
    from tulip_mega.parallel.spawn import run_distributed

    results = sorted(run_distributed(worker, 4, args, timeout=1800), key=lambda r: r["rank"])
    print(f"vision {args.vision_layers} layers x {(args.image_size // 16) ** 2} patches, text {args.text_layers} "
          f"layers x {args.text_tokens} tokens, width {args.width}, micro-batch {args.micro_batch}; PP=4, "
          f"median of {args.reps} reps per stage (forward+backward of the stage alone)")
    slowest_flops = {}
    for name in SPLITS:
        cfg = load_config(None, overrides(args) + [f"parallel.pipeline_split={name}"])
        layout = resolve_layout(cfg, 4)
        costs, split = stage_costs(cfg, layout.streams), layout.split
        flops = costs.stages(split)
        slowest_flops[name] = max(flops)
        ms = [r["median"][name] * 1e3 for r in results]
        print(f"  {name:8s} split {[list(s) for s in split]}")
        print(f"           measured ms per stage {' '.join(f'{t:7.2f}' for t in ms)}   max/min {max(ms) / min(ms):.2f}")
        print(f"           plan MFLOP per stage  {' '.join(f'{f / 1e6:7.1f}' for f in flops)}   "
              f"max/min {max(flops) / min(flops):.2f}")
        print(f"           slowest stage: measured {max(ms):.2f} ms")
    even = max(r["median"]["even"] for r in results)
    bal = max(r["median"]["balanced"] for r in results)
    print(f"  slowest stage even / balanced: measured {even / bal:.2f}x, "
          f"plan {slowest_flops['even'] / slowest_flops['balanced']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
