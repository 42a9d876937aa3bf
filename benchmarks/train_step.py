"""Time per training step: our megatron-core model vs a plain PyTorch model of the same size.

Why: megatron-core brings TP/PP/DP, but its wrappers (DDP grad buffers, the schedule, the
megatron optimizer with fp32 master weights) must not make a single-GPU or CPU step much
slower than the obvious PyTorch code. Both models run in the same process, on the same
random batch, with the same SigLIP loss (tulip_mega.losses.sigmoid_loss) and the same AdamW
hyper-parameters and grad clipping:

  ours   TulipModel (megatron TransformerBlocks, TE layers when TE imports unless --backend
         local) + megatron DDP + megatron optimizer + TrainStep (forward_backward_func);
  plain  tulip_mega.convert.plain_model.TulipPlainModel (nn.Linear / nn.MultiheadAttention,
         the same architecture) + torch.optim.AdamW (foreach) + clip_grad_norm_; bf16 runs
         it under torch.autocast with fp32 weights (the usual PyTorch mixed precision).

Timing: `--warmup` steps first (excluded), then `--steps` steps, each timed alone between
device synchronisations; the median is reported. The runs alternate step by step (ours, plain,
ours, plain, ...), so drift of a shared machine hits both. Model FLOPs come from
tulip_mega.flops (3 x forward, logits of the micro-batch included); on a GPU in the
peak table the MFU is printed too.

Runs single-process: gloo on a CPU, NCCL on one CUDA GPU (picked at run time). Examples:

  python benchmarks/train_step.py --size debug --micro-batch 32
  python benchmarks/train_step.py --size b16 --layers 2 --micro-batch 8          # B/16 widths, CPU
  python benchmarks/train_step.py --size g16 --layers 4 --micro-batch 32 --dtype bf16   # 1B shapes, H100

`--contrastive-batch global|micro|both` compares instead our step in the two modes of
`loss.contrastive_batch` (docs/losses.md) with `--accum` micro-batches per step: step time and
peak memory per mode, alternating step by step, and their ratio against micro (the baseline)
in the same run. Peak memory is benchmarks/peak_memory.py's (peak RSS on a CPU, started with
MALLOC_MMAP_THRESHOLD_=131072; max allocated on a GPU). Add loss-stack overrides for the TULIP
stack, e.g. `--contrastive-batch both --size b16 --layers 2 --micro-batch 4 --accum 4`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for `python benchmarks/...`
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated")

import torch  # noqa: E402


def build_cfg(args, mode: str = "global"):
    from tulip_mega.config import load_config

    accum = args.accum if args.contrastive_batch else 1
    o = [f"model.size={args.size}", f"train.micro_batch_size={args.micro_batch}",
         f"train.global_batch_size={args.micro_batch * accum}", f"precision.dtype={args.dtype}",
         f"loss.contrastive_batch={mode}", "optim.warmup_steps=0",
         f"train.steps={args.warmup + 2 * args.steps + 10}", "optim.lr=1e-4"]
    if args.layers:
        o += [f"model.vision.num_layers={args.layers}", f"model.text.num_layers={args.layers}"]
    return load_config(None, o + list(args.overrides))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batch(cfg, dev, seed: int = 0):
    """One micro-batch of random inputs with every field the recipe's loss terms need."""
    from tulip_mega.data.base import Batch
    from tulip_mega.config.streams import input_streams

    g = torch.Generator().manual_seed(seed)
    b, s = cfg.train.micro_batch_size, cfg.model.vision.image_size
    L, vocab = cfg.model.text.context_length, cfg.model.text.vocab_size
    st = input_streams(cfg)

    def tokens(*lead):
        return torch.randint(3, vocab, (*lead, L), generator=g)

    batch = Batch(images=torch.randn(b, 3, s, s, generator=g), tokens=tokens(b),
                  keys=[f"{seed}-{i}" for i in range(b)])
    if st.extra_global_crops:
        batch.crops = torch.randn(b, st.extra_global_crops, 3, s, s, generator=g)
    if st.local_crops:
        batch.local_crops = torch.randn(b, st.local_crops, 3, st.local_size, st.local_size, generator=g)
    if st.geco_edits:
        batch.edits, batch.edit_valid = torch.randn(b, 2, 3, s, s, generator=g), torch.ones(b, 2, dtype=torch.bool)
    if st.paraphrases:
        batch.paraphrases = tokens(b, st.paraphrases)
        batch.paraphrase_valid = torch.ones(b, st.paraphrases, dtype=torch.bool)
    if st.negatives:
        batch.negatives, batch.negative_valid = tokens(b, st.negatives), torch.ones(b, st.negatives, dtype=torch.bool)
    if st.eda_caption:
        batch.eda_tokens = tokens(b)
    return batch.to(dev)


class Ours:
    def __init__(self, cfg, use_te):
        from tulip_mega.launch import resolve_layout
        from tulip_mega.models.build import build_model
        from tulip_mega.training.optimizer import make_optimizer, make_scheduler
        from tulip_mega.training.data import caption_pad_id
        from tulip_mega.training.step import TrainStep, wrap_ddp

        layout = resolve_layout(cfg, torch.distributed.get_world_size())
        self.model = wrap_ddp([build_model(cfg, layout, use_te=use_te)], cfg)
        optimizer = make_optimizer(cfg, self.model)
        self.step = TrainStep(cfg, layout, self.model, optimizer, make_scheduler(cfg, optimizer),
                              pad_id=caption_pad_id(cfg))

    def __call__(self, batch) -> float:
        batches = batch if isinstance(batch, list) else [batch]
        return self.step(iter(batches))["loss"]


class Plain:
    def __init__(self, cfg, dev):
        import dataclasses

        from tulip_mega.convert.plain_model import PlainConfig, TulipPlainModel
        from tulip_mega.losses import sigmoid_loss

        m = cfg.model
        self.model = TulipPlainModel(PlainConfig(vision=dataclasses.asdict(m.vision), text=dataclasses.asdict(m.text),
                                                 layernorm_eps=m.layernorm_eps)).to(dev)
        for p in self.model.parameters():  # the plain model's own init is zeros for the probe / scale
            torch.nn.init.normal_(p, std=m.init_std)
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.clip = o.clip_grad
        self.loss = sigmoid_loss
        self.autocast = cfg.precision.dtype == "bf16"
        self.device_type = dev.type

    def __call__(self, batch) -> float:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            img = self.model.encode_image(batch.images)
            txt = self.model.encode_text(batch.tokens)
            loss = self.loss(img, txt, self.model.logit_scale.float().exp(), self.model.logit_bias.float())
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.item()


def timed(fn, batch) -> float:
    sync()
    t0 = time.perf_counter()
    fn(batch)
    sync()
    return time.perf_counter() - t0


def print_header(args, cfg, device_note: str, model_note: str) -> None:
    """The device and model lines every report starts with."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    v, t = cfg.model.vision, cfg.model.text
    print(f"device: {name} | {args.dtype} | torch {torch.__version__}" + (f" | {device_note}" if device_note else ""))
    print(f"model: {args.size} vision {v.num_layers}L h{v.hidden_size} s{v.seq_length}, text {t.num_layers}L "
          f"h{t.hidden_size} s{t.context_length} | {model_note}")


def compare_contrastive_modes(args, use_te) -> None:
    """Our step with loss.contrastive_batch=global vs micro at --accum micro-batches per step."""
    from benchmarks.peak_memory import peak_since, reset_peak
    from tulip_mega.parallel.init import device as get_device
    from tulip_mega.flops import count_flops, embedding_cache_flops
    from tulip_mega.launch import resolve_layout

    modes = ["micro", "global"] if args.contrastive_batch == "both" else [args.contrastive_batch]
    dev = get_device()
    cfgs = {m: build_cfg(args, m) for m in modes}
    steps = {m: Ours(cfgs[m], use_te) for m in modes}
    batches = [make_batch(cfgs[modes[0]], dev, seed=i) for i in range(args.accum)]
    for _ in range(args.warmup):
        for m in modes:
            steps[m](batches)
    times = {m: [] for m in modes}
    peaks = {m: [] for m in modes}
    method = "?"
    for _ in range(args.steps):  # alternate step by step: drift of a shared machine hits both
        for m in modes:
            method, before = reset_peak()
            times[m].append(timed(steps[m], batches))
            peaks[m].append(peak_since(method, before))
    cfg = cfgs[modes[0]]
    fwd = count_flops(cfg, resolve_layout(cfg, 1).streams).forward
    last = cfgs[modes[-1]]
    cache = embedding_cache_flops(last, resolve_layout(last, 1)) if "global" in modes else 0
    terms = [n for n in ("image_text", "image_image", "text_text", "mae", "text_recon", "aug_contrastive")
             if getattr(cfg.loss.weights, n) > 0]
    print_header(args, cfg, f"peak memory: {method}", f"loss terms: {', '.join(terms)}")
    print(f"step = {args.accum} micro-batches of {args.micro_batch}; contrastive batch: micro {args.micro_batch}, "
          f"global {args.micro_batch * args.accum}; embedding-cache forward = {cache / max(fwd, 1):.2f} x the "
          f"training forward ({cache / (3 * max(fwd, 1)):.0%} of the 3x-forward model FLOPs)")
    med = {m: statistics.median(times[m]) for m in modes}
    peak = {m: max(peaks[m]) / 2**20 for m in modes}
    for m in modes:
        print(f"{m:>6}: median {1e3 * med[m]:9.2f} ms/step (min {1e3 * min(times[m]):.2f}, max "
              f"{1e3 * max(times[m]):.2f}, n={len(times[m])}) | peak +{peak[m]:8.1f} MiB")
    if len(modes) == 2:
        print(f"ratio global / micro: step time {med['global'] / med['micro']:.3f}, "
              f"peak memory {peak['global'] / max(peak['micro'], 1e-9):.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["debug", "b16", "so400m", "g16"], default="debug")
    p.add_argument("--layers", type=int, default=None, help="override both towers' num_layers (widths unchanged)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--backend", choices=["auto", "local", "te"], default="auto",
                   help="our layers: TE when it imports (auto), megatron's local layers, or TE")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--contrastive-batch", choices=["global", "micro", "both"], default=None,
                   help="compare our step in these loss.contrastive_batch modes instead of ours vs plain")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step with --contrastive-batch")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides key=value")
    args = p.parse_args()

    from tulip_mega.parallel.init import init_parallel
    from tulip_mega.parallel.init import device as get_device
    from tulip_mega.config.streams import input_streams
    from tulip_mega.flops import count_flops
    from tulip_mega.training.throughput import device_peak

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29517")
    cfg = build_cfg(args)
    init_parallel(1, 1, cfg.run.seed)
    dev = get_device()
    use_te = {"auto": None, "local": False, "te": True}[args.backend]
    if args.contrastive_batch:
        compare_contrastive_modes(args, use_te)
        from tulip_mega.parallel.init import destroy_parallel

        destroy_parallel()
        return 0
    ours, plain = Ours(cfg, use_te), Plain(cfg, dev)
    n_ours = sum(p.numel() for part in ours.model for p in part.parameters())
    n_plain = sum(p.numel() for p in plain.model.parameters())
    batch = make_batch(cfg, dev)
    for _ in range(args.warmup):
        ours(batch)
        plain(batch)
    times = {"ours": [], "plain": []}
    for _ in range(args.steps):  # alternate step by step: drift of a shared machine hits both
        times["ours"].append(timed(ours, batch))
        times["plain"].append(timed(plain, batch))

    flops = count_flops(cfg, input_streams(cfg), contrastive_batch=cfg.train.micro_batch_size)
    peak, note = device_peak(args.dtype)
    print_header(args, cfg, "", f"micro-batch {cfg.train.micro_batch_size} | params ours {n_ours / 1e6:.2f}M, "
                                f"plain {n_plain / 1e6:.2f}M")
    print(f"model FLOPs per step: {flops.training * cfg.train.micro_batch_size / 1e12:.4f} TFLOP "
          f"({flops.training / 1e9:.3f} GFLOP per sample, 3x forward)")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("ours", "plain"):
        tflops = flops.training * cfg.train.micro_batch_size / med[k] / 1e12
        line = (f"{k:>5}: median {1e3 * med[k]:9.2f} ms/step (min {1e3 * min(times[k]):.2f}, max "
                f"{1e3 * max(times[k]):.2f}, n={len(times[k])}) | {tflops:8.3f} TFLOP/s")
        if peak:
            line += f" | MFU {100 * tflops / peak:5.1f}%"
        print(line)
    print(f"ratio ours / plain: {med['ours'] / med['plain']:.3f}" + ("" if peak else f"   ({note})"))
    from tulip_mega.parallel.init import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    if "--contrastive-batch" in sys.argv and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Peak RSS tracks live tensors only if large blocks are unmapped on free (peak_memory.py).
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())
