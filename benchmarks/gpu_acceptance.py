"""GPU acceptance: the checks CI cannot run, in one command on one GPU node; one markdown report.

CI and the development machines have no GPU, so the CUDA-only paths (NCCL, Transformer Engine
and FP8, DALI `mixed` decode, megatron's overlapped gradient reduction, the GPU fusions) are kept
right by construction. This script is what a user runs first on their hardware (and the project
on a lent GPU) to see that construction hold:

  environment        device, driver-visible GPUs, torch / megatron-core / TE / DALI / apex versions
  cuda_vs_cpu        one GPU (NCCL, fp32, TF32 off) equals the CPU reference: every loss term and
                     every gradient of the full TULIP stack, padded captions, 4 micro-batches
  nccl_layouts       TP2, PP2, DP2 (and TP2 x PP2 on 4 GPUs) over NCCL equal the CPU reference
  overlap_grad_reduce  megatron DDP with overlapped reduction + distributed optimizer trains like
                     the plain setting (5 optimizer steps, fp32)
  gpu_fusions        the GPU-only switches (models/megatron_config.gpu_switches) on vs forced off: same
                     losses in fp32 (full stack), and the step time ratio at B/16 widths in bf16
  te_fp8_curves      TE bf16 vs FP8 (hybrid, delayed scaling) loss curves, 50 steps
  te_checkpoint_on_cpu  a checkpoint written by TE layers on the GPU resumes on the CPU with local layers
  dali_mixed_decode  DALI `mixed` (nvJPEG) decode vs CPU decode of the same batch
  mfu                step time and MFU of the B/16 and 1B (g/16) widths (benchmarks/train_step.py)

Each check passes, fails (with the reason) or is skipped with why (no GPU, one GPU, TE or DALI
not importable): on a CPU machine the whole script runs and reports the GPU parts as skipped.
Exit status 1 when any check failed.

    bash scripts/gpu_acceptance.sh [--out report.md] [--only cuda_vs_cpu,mfu] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

# The full TULIP stack at the debug size: every term, both decoders, GeCo views, 4 micro-batches.
TULIP = [
    "train.global_batch_size=16", "train.micro_batch_size=4",
    "loss.weights.image_image=1", "loss.weights.text_text=0.5", "loss.weights.mae=2", "loss.weights.text_recon=0.7",
    "data.views.global_crops=2", "data.views.local_crops=2", "data.views.local_size=16",
    "data.views.geco_images=true", "data.views.paraphrases=2", "data.views.negatives=2",
    "model.mae_decoder.num_layers=1", "model.text_decoder.num_layers=1",
]
FP32 = ["precision.dtype=fp32"]
LOSS_RTOL = 1e-4  # fp32 GPU vs CPU, TF32 off: reduction order only
GRAD_RTOL = 2e-3  # of each tensor's largest entry


class Skip(Exception):
    """A check that cannot run on this machine; the message says why."""


@dataclasses.dataclass
class Result:
    name: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float = 0.0


# ----------------------------------------------------------------------------- machine facts

def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def importable(module: str) -> Optional[str]:
    """The module's version when it imports, else None."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # ImportError, OSError (missing CUDA libraries), RuntimeError (no GPU)
        return None
    return str(getattr(mod, "__version__", "present"))


def need_gpus(n: int) -> None:
    found = gpu_count()
    if found < n:
        why = "no CUDA device" if found == 0 else f"{found} GPU(s) visible; NCCL refuses two ranks on one GPU"
        raise Skip(f"needs {n} GPU(s): {why}")


def need_te() -> None:
    need_gpus(1)
    if importable("transformer_engine.pytorch") is None:
        raise Skip("Transformer Engine does not import (install tulip-mega[gpu] or use an NGC PyTorch container)")


@contextlib.contextmanager
def cuda_hidden() -> Iterator[None]:
    """Processes started inside see no GPU: the CPU reference runs in children of this process."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


# ----------------------------------------------------------------------------- rank workers

def exact_fp32() -> None:
    """fp32 matmuls and convolutions without TF32, so a GPU step can equal the CPU's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def layout_worker(overrides: list[str], steps: int = 1, optimizer_steps: bool = False) -> dict:
    """harness.step_worker in exact fp32, results moved to the CPU for the parent."""
    from harness import step_worker

    exact_fp32()
    return to_cpu(step_worker(overrides, steps, optimizer_steps))


def run_ranks(world: int, backend: str, *args, **kwargs) -> list[dict]:
    from tulip_mega.parallel.spawn import run_distributed

    return run_distributed(layout_worker, world, *args, backend=backend, timeout=kwargs.pop("timeout", 900))


def cpu_reference(overrides: list[str], **kw) -> list[dict]:
    with cuda_hidden():
        return run_ranks(1, "gloo", overrides, **kw)


def compare_steps(out: list[dict], ref: list[dict], loss_rtol: float = LOSS_RTOL,
                  grad_rtol: float = GRAD_RTOL) -> str:
    """Every loss term and assembled gradient of `out` against `ref`; raises AssertionError with
    the worst offenders, returns the worst relative differences as text."""
    from harness import assemble

    loss_err = {}
    for name, want in ref[0]["metrics"].items():
        if name.startswith("loss"):
            got = out[0]["metrics"][name]
            loss_err[name] = abs(got - want) / max(abs(want), 1e-12)
    R = assemble([r["entries"] for r in ref])
    G = assemble([r["entries"] for r in out])
    if set(G) != set(R):
        raise AssertionError(f"parameter sets differ: {sorted(set(G) ^ set(R))[:5]}")
    grad_err = {k: float((G[k] - R[k]).abs().max() / R[k].abs().max().clamp_min(1e-12)) for k in R}
    worst_loss = max(loss_err.items(), key=lambda kv: kv[1])
    worst_grad = max(grad_err.items(), key=lambda kv: kv[1])
    summary = (f"{len(loss_err)} loss terms, worst {worst_loss[0]} rel {worst_loss[1]:.1e}; {len(grad_err)} "
               f"gradients, worst {worst_grad[0]} rel {worst_grad[1]:.1e}")
    bad_loss = {k: v for k, v in loss_err.items() if v > loss_rtol}
    bad_grad = {k: v for k, v in grad_err.items() if v > grad_rtol}
    if bad_loss or bad_grad:
        raise AssertionError(f"{summary}; over tolerance: losses {bad_loss}, gradients "
                             f"{dict(list(bad_grad.items())[:5])}")
    return summary


# ----------------------------------------------------------------------------- the checks

def check_environment(args) -> str:
    versions = {m: importable(m) for m in ("megatron.core", "transformer_engine.pytorch", "nvidia.dali", "apex")}
    dev = torch.cuda.get_device_name(0) if gpu_count() else f"CPU ({os.cpu_count()} cores)"
    cuda = torch.version.cuda or "none"
    return (f"{dev}; {gpu_count()} GPU(s); torch {torch.__version__} (CUDA {cuda}); megatron-core "
            f"{versions['megatron.core']}; Transformer Engine {versions['transformer_engine.pytorch'] or 'absent'}; "
            f"DALI {versions['nvidia.dali'] or 'absent'}; apex {versions['apex'] or 'absent'}")


def check_cuda_vs_cpu(args) -> str:
    need_gpus(1)
    overrides = TULIP + FP32 + ["model.transformer_impl=local"]
    ref = cpu_reference(overrides)
    out = run_ranks(1, "nccl", overrides)
    return "TP1 on one GPU vs CPU: " + compare_steps(out, ref)


LAYOUTS = {
    "TP2": (2, ["parallel.tensor_parallel=2"]),
    "PP2": (2, ["parallel.pipeline_parallel=2"]),
    "DP2": (2, []),
    "TP2xPP2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
}


def check_nccl_layouts(args) -> str:
    need_gpus(2)
    base = TULIP + FP32 + ["model.transformer_impl=local"]
    ref = cpu_reference(base)
    lines = []
    for name, (world, extra) in LAYOUTS.items():
        if world > gpu_count():
            lines.append(f"{name}: skipped ({world} GPUs needed)")
            continue
        lines.append(f"{name}: " + compare_steps(run_ranks(world, "nccl", base + extra), ref))
    return "; ".join(lines)


def check_overlap_grad_reduce(args) -> str:
    need_gpus(1)
    world = min(gpu_count(), 2)
    base = TULIP + FP32 + ["model.transformer_impl=local", "train.steps=5"]
    on = base + ["parallel.overlap_grad_reduce=true", "parallel.distributed_optimizer=true"]
    off = base + ["parallel.overlap_grad_reduce=false", "parallel.distributed_optimizer=false"]
    a = run_ranks(world, "nccl", on, 5, True)
    b = run_ranks(world, "nccl", off, 5, True)
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[0]["losses"], b[0]["losses"])]
    if max(diffs) > 1e-4 or not b[0]["losses"][-1] < b[0]["losses"][0]:
        raise AssertionError(f"losses overlap+ZeRO-1 {a[0]['losses']} vs plain {b[0]['losses']}")
    return (f"DP{world}, 5 steps: loss {b[0]['losses'][0]:.4f} -> {b[0]['losses'][-1]:.4f}, overlap + distributed "
            f"optimizer within rel {max(diffs):.1e}")


def switches_worker(overrides: list[str], steps: int, fused: bool) -> dict:
    """`steps` optimizer steps with the GPU switches as this machine chooses them (fused) or all
    forced off; losses and the median step time after 2 untimed steps."""
    import statistics

    from harness import build_train_step, global_batches, rank_microbatches
    from megatron.core import parallel_state
    from tulip_mega.models import megatron_config

    exact_fp32()
    if not fused:
        chosen = megatron_config.gpu_switches
        megatron_config.gpu_switches = lambda cfg, use_te: dataclasses.replace(
            chosen(cfg, use_te), wgrad_fusion_te=False, wgrad_fusion_megatron=False, bias_gelu_fusion=False,
            bias_dropout_fusion=False, tp_only_amax_reduction=False, drop_core_attn_recompute=False)
    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    switches = megatron_config.layer_choices(cfg).gpu
    batches = global_batches(cfg, 2, seed=1)
    dp = parallel_state.get_data_parallel_rank()
    losses, times = [], []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = step(rank_microbatches(cfg, [batches[i % 2]], dp, 1))
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    return {"losses": losses, "ms": 1e3 * statistics.median(times), "switches": dataclasses.asdict(switches)}


def check_gpu_fusions(args) -> str:
    need_gpus(1)
    # Same function: fp32 debug-size full stack, fused vs unfused within fp32 rounding.
    exact = TULIP + FP32 + ["model.transformer_impl=local"]
    on = run_distributed_one(switches_worker, exact + ["precision.bias_fusions=true"], 5, True)
    off = run_distributed_one(switches_worker, exact, 5, False)
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(on["losses"], off["losses"])]
    if max(diffs) > 1e-4:
        raise AssertionError(f"losses with the GPU switches {on['losses']} vs without {off['losses']}")
    enabled = sorted(k for k, v in on["switches"].items() if v and k not in ("cuda", "te"))
    # Speed: B/16 widths, 2 layers per tower, bf16, plain SigLIP; alternating runs are separate processes.
    steps = 5 if args.quick else 20
    speed = ["model.size=b16", "model.vision.num_layers=2", "model.text.num_layers=2", "train.global_batch_size=128",
             "train.micro_batch_size=128", "precision.dtype=bf16"]
    fast = run_distributed_one(switches_worker, speed + ["precision.bias_fusions=true"], steps, True)["ms"]
    slow = run_distributed_one(switches_worker, speed, steps, False)["ms"]
    return (f"on: {', '.join(enabled) or 'none'}; fp32 full stack, 5 steps: losses within rel {max(diffs):.1e}; "
            f"b16 widths 2+2 layers micro 128 bf16: {fast:.1f} ms/step with vs {slow:.1f} without "
            f"(ratio {fast / slow:.3f})")


def run_distributed_one(fn: Callable, *args) -> dict:
    from tulip_mega.parallel.spawn import run_distributed

    return run_distributed(fn, 1, *args, backend="nccl", timeout=900)[0]


def check_te_fp8_curves(args) -> str:
    need_te()
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 9):
        raise Skip(f"FP8 needs compute capability >= 8.9 (found {major}.{minor})")
    steps = 10 if args.quick else 50
    base = ["model.size=b16", "model.vision.num_layers=2", "model.text.num_layers=2", "train.global_batch_size=32",
            "train.micro_batch_size=32", "precision.dtype=bf16", "model.transformer_impl=te", f"train.steps={steps}"]
    bf16 = run_ranks(1, "nccl", base, steps, True)[0]["losses"]
    fp8 = run_ranks(1, "nccl", base + ["precision.fp8=hybrid"], steps, True)[0]["losses"]
    gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fp8, bf16))
    if not all(x == x for x in fp8) or abs(fp8[-1] - bf16[-1]) > 0.05 * abs(bf16[-1]):
        raise AssertionError(f"FP8 curve left bf16's: bf16 {bf16[-1]:.4f}, fp8 {fp8[-1]:.4f}")
    return (f"b16 widths, 2 layers/tower, {steps} steps: bf16 {bf16[0]:.3f} -> {bf16[-1]:.3f}, FP8 {fp8[0]:.3f} -> "
            f"{fp8[-1]:.3f}, largest per-step gap {gap:.1%}")


def check_te_checkpoint_on_cpu(args) -> str:
    need_te()
    out = Path(args.workdir) / "te_checkpoint"
    cmd = [sys.executable, str(Path(__file__)), "--te-checkpoint-stage", "save", "--workdir", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    load = subprocess.run([*cmd[:3], "load", "--workdir", str(out)], cwd=ROOT, env=env, timeout=900,
                          capture_output=True, text=True)
    if load.returncode:
        raise AssertionError(f"loading the TE checkpoint on the CPU failed:\n{load.stderr[-2000:]}")
    return load.stdout.strip().splitlines()[-1]


def te_checkpoint_stage(stage: str, workdir: Path) -> None:
    """Child process of te_checkpoint_on_cpu: `save` trains 2 steps with TE layers on the GPU
    and saves; `load` (CUDA hidden) resumes that checkpoint with local layers and checks the
    loss of the next step equals what the GPU computed for it."""
    import json

    from harness import build_train_step, global_batches, rank_microbatches
    from megatron.core import parallel_state
    from tulip_mega.training.checkpoint import load_checkpoint, model_shape, read_latest, save_checkpoint

    exact_fp32()
    impl = "te" if stage == "save" else "local"
    cfg, model, optimizer, scheduler, step = build_train_step(TULIP + FP32 + [f"model.transformer_impl={impl}"])
    batches = global_batches(cfg, 3)
    dp = parallel_state.get_data_parallel_rank()
    root = workdir / "ckpt"
    if stage == "save":
        for b in batches[:2]:
            step(rank_microbatches(cfg, [b], dp, 1))
        save_checkpoint(root, 2, model, optimizer, scheduler, None, model_shape(cfg))
        nxt = step.forward_backward(rank_microbatches(cfg, [batches[2]], dp, 1))["loss"]
        (workdir / "next_loss.json").write_text(json.dumps({"loss": nxt}))
        return
    load_checkpoint(read_latest(root), model, optimizer, scheduler, None, model_shape(cfg))
    got = step.forward_backward(rank_microbatches(cfg, [batches[2]], dp, 1))["loss"]
    want = json.loads((workdir / "next_loss.json").read_text())["loss"]
    assert abs(got - want) <= 1e-3 * abs(want), f"resumed on CPU: loss {got} vs {want} on the GPU"
    print(f"TE checkpoint (step 2) resumed on the CPU with local layers: next loss {got:.5f} vs GPU {want:.5f}")


def check_dali_mixed_decode(args) -> str:
    need_gpus(1)
    if importable("nvidia.dali") is None:
        raise Skip("DALI does not import (pip install nvidia-dali-cuda120 or -cuda130)")
    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan
    from tulip_mega.datagen.synthetic import write_shapes_dataset
    from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer_from_shards

    data = Path(args.workdir) / "dali_shapes"
    info = write_shapes_dataset(str(data), num_train=256, num_val=0, samples_per_shard=64, image_size=224)
    tok = Tokenizer(train_tokenizer_from_shards(info["train_spec"], str(data / "tok"), vocab_size=256), 16)
    plan = ViewPlan(image_size=224, crops=1, local_crops=2, local_size=96, edits=True)
    batches = {}
    for gpu in (True, False):
        loader = DaliLoader(info["train_spec"], 32, plan, tok, seed=3, gpu=gpu)
        batches[gpu] = next(iter(loader))
    worst = {}
    for field in ("images", "crops", "local_crops", "edits"):
        a, b = getattr(batches[True], field), getattr(batches[False], field)
        if a is None:
            continue
        diff = (a.float().cpu() - b.float().cpu()).abs()
        worst[field] = (float(diff.mean()), float(diff.max()))
    # nvJPEG and libjpeg-turbo differ in IDCT / chroma upsampling rounding: a few levels of 255.
    bad = {k: v for k, v in worst.items() if v[0] > 0.02}
    text = ", ".join(f"{k} mean {m:.4f} max {x:.3f}" for k, (m, x) in worst.items())
    if bad:
        raise AssertionError(f"mixed vs CPU decode (normalised units): {text}")
    return f"batch of 32 at 224 px, normalised units: {text}"


MFU_RUNS = {  # label -> train_step.py arguments (the 1B recipe's widths, fewer layers to fit beside the baseline)
    "b16": ["--size", "b16", "--micro-batch", "128"],
    "g16 (1B widths, 4 layers/tower)": ["--size", "g16", "--layers", "4", "--micro-batch", "128"],
}


def check_mfu(args) -> str:
    need_gpus(1)
    out = []
    for label, extra in MFU_RUNS.items():
        steps = ["--steps", "5", "--warmup", "2"] if args.quick else ["--steps", "10", "--warmup", "3"]
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), *extra, "--dtype", "bf16",
                               *steps], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise AssertionError(f"train_step.py {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
        ours = next((ln for ln in proc.stdout.splitlines() if ln.strip().startswith("ours:")), "")
        mfu = re.search(r"MFU\s+([\d.]+)%", ours)
        ms = re.search(r"median\s+([\d.]+) ms", ours)
        ratio = re.search(r"ratio ours / plain: ([\d.]+)", proc.stdout)
        out.append(f"{label}: {ms.group(1) if ms else '?'} ms/step, MFU {mfu.group(1) if mfu else '?'}%, "
                   f"ours/plain {ratio.group(1) if ratio else '?'}")
    return "; ".join(out)


CHECKS: dict[str, Callable] = {
    "environment": check_environment,
    "cuda_vs_cpu": check_cuda_vs_cpu,
    "nccl_layouts": check_nccl_layouts,
    "overlap_grad_reduce": check_overlap_grad_reduce,
    "gpu_fusions": check_gpu_fusions,
    "te_fp8_curves": check_te_fp8_curves,
    "te_checkpoint_on_cpu": check_te_checkpoint_on_cpu,
    "dali_mixed_decode": check_dali_mixed_decode,
    "mfu": check_mfu,
}


# ----------------------------------------------------------------------------- driver and report

def run_check(name: str, fn: Callable, args) -> Result:
    t0 = time.perf_counter()
    try:
        detail, status = fn(args), "pass"
    except Skip as e:
        detail, status = str(e), "skip"
    except Exception as e:  # noqa: BLE001 - every failure goes into the report
        tb = traceback.format_exc(limit=3)
        detail, status = f"{type(e).__name__}: {str(e)[:1500]}", "fail"
        print(tb, file=sys.stderr, flush=True)
    return Result(name, status, detail, time.perf_counter() - t0)


def markdown(results: list[Result]) -> str:
    head = ["# GPU acceptance report", "", f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; `bash scripts/gpu_acceptance.sh`", "",
            "| check | status | seconds | detail |", "|---|---|---|---|"]
    rows = [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/').replace(chr(10), ' ')} |"
            for r in results]
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    return "\n".join(head + rows + ["", f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped", ""])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_acceptance.md", help="markdown report path")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CHECKS)}")
    p.add_argument("--quick", action="store_true", help="fewer steps in the timed checks")
    p.add_argument("--workdir", default=None, help="scratch folder (default: beside the report)")
    p.add_argument("--te-checkpoint-stage", choices=["save", "load"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workdir = args.workdir or str(Path(args.out).resolve().parent / "gpu_acceptance_work")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.te_checkpoint_stage:
        os.environ.setdefault("MASTER_PORT", "29531")
        te_checkpoint_stage(args.te_checkpoint_stage, Path(args.workdir))
        return 0
    names = list(CHECKS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"--only: unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    results = []
    for name in names:
        print(f"[gpu_acceptance] {name} ...", flush=True)
        r = run_check(name, CHECKS[name], args)
        print(f"[gpu_acceptance] {name}: {r.status} ({r.seconds:.1f} s) {r.detail}", flush=True)
        results.append(r)
    report = markdown(results)
    Path(args.out).write_text(report)
    print(report)
    print(f"report: {args.out}")
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
