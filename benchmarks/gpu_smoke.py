"""One-GPU smoke test and step timing of the training step (NCCL, bf16, distributed optimizer).

CI has no GPU, so the CUDA path (NCCL process group, bf16 params, megatron's distributed
optimizer, CUDA RNG tracker) is checked here on a lent machine: a few steps of the plain
SigLIP stack and of the full TULIP stack on random batches must give finite, falling losses;
then the time per step of the full stack is printed as a ratio against the plain SigLIP step
of the same towers, measured in the same run.

    python benchmarks/gpu_smoke.py [--size debug|b16] [--micro 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TULIP = [
    "loss.weights.image_image=1", "loss.weights.text_text=1", "loss.weights.mae=1", "loss.weights.text_recon=1",
    "data.views.global_crops=2", "data.views.local_crops=4", "data.views.geco_images=true",
    "data.views.paraphrases=2", "data.views.negatives=2",
]


def run(label: str, overrides: list[str], steps: int) -> dict:
    import torch
    from megatron.core import parallel_state

    from harness import build_train_step, global_batches, rank_microbatches

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    batches = global_batches(cfg, 2, seed=1)
    times, losses, metrics = [], [], {}
    for i in range(steps):
        it = rank_microbatches(cfg, [batches[i % 2]], parallel_state.get_data_parallel_rank(), 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = step(it)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    ms = 1000 * statistics.median(times[3:]) if steps > 4 else float("nan")
    dtype = next(model.parameters()).dtype
    print(f"[{label}] params {dtype} | loss {losses[0]:.3f} -> {losses[-1]:.3f} | median step {ms:.1f} ms | "
          f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | terms "
          + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("loss/")), flush=True)
    assert all(map(lambda x: x == x and abs(x) < 1e4, losses)), f"{label}: non-finite loss {losses}"
    assert losses[-1] < losses[0], f"{label}: loss did not fall {losses}"
    del model, optimizer, scheduler, step
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"ms": ms, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="debug")
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import torch

    from tulip_mega.parallel.init import use_cuda

    assert torch.cuda.is_available() and use_cuda(), "this smoke test is for a CUDA machine"
    base = [f"model.size={args.size}", f"train.global_batch_size={args.micro}", f"train.micro_batch_size={args.micro}",
            "precision.dtype=bf16", "parallel.distributed_optimizer=true", "optim.lr=1e-3",
            f"train.steps={args.steps}"]
    if args.size == "debug":
        base += ["model.vision.image_size=32", "model.vision.patch_size=8", "data.views.local_size=16"]
    else:
        from tulip_mega.config import SIZES

        vision = SIZES[args.size][0]
        base += [f"model.vision.image_size={vision['image_size']}", f"model.vision.patch_size={vision['patch_size']}",
                 f"data.views.local_size={6 * vision['patch_size']}"]
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    plain = run("siglip", base, args.steps)
    full = run("tulip-full", base + TULIP, args.steps)
    print(f"full TULIP step / plain SigLIP step = {full['ms'] / plain['ms']:.2f}x ({args.size}, micro {args.micro})")
    import torch.distributed as dist

    print(f"backend {dist.get_backend()}")


if __name__ == "__main__":
    main()
