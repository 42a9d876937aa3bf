"""The training loop: recipe in, trained checkpoint + metrics out.

Order matters and is the same on every rank: validate the recipe and layout (before any
process group), initialise parallel state, build the model stage, DDP, optimizer, scheduler
and loader, restore the newest checkpoint if asked, then step until `train.steps`, logging
and checkpointing on the way. Uses megatron-core directly (no megatron.training globals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tulip_mega.config import Config, save_config, validate_layout
from tulip_mega.models.build import build_model
from tulip_mega.parallel.init import LaunchEnv, check_runtime_support, device, init_parallel, launch_env
from tulip_mega.training.async_checkpoint import CheckpointWriter
from tulip_mega.training.checkpoint import load_checkpoint, read_latest
from tulip_mega.training.data import build_train_loader
from tulip_mega.training.flops import contrastive_batch_size, count_flops, tokens_per_sample
from tulip_mega.training.metrics import MetricsLogger, setup_logging
from tulip_mega.training.wandb_logger import make_wandb_sink
from tulip_mega.training.throughput import (
    LoaderWait,
    StragglerDetector,
    TimedIterator,
    achieved_tflops,
    device_peak,
    mfu,
    peak_memory_gib,
    precision_name,
)
from tulip_mega.training.signals import PreemptionSignal
from tulip_mega.training.optimizer import make_optimizer, make_scheduler
from tulip_mega.training.step import TrainStep, wrap_ddp

log = logging.getLogger("tulip_mega")


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def model_shape(cfg: Config) -> dict:
    """The architecture keys a checkpoint must match (and that conversion reads back)."""
    return {
        "vision": dataclasses.asdict(cfg.model.vision),
        "text": dataclasses.asdict(cfg.model.text),
        "layernorm_eps": cfg.model.layernorm_eps,
    }


def train(cfg: Config, env: Optional[LaunchEnv] = None) -> dict:
    """Train per the recipe; returns a summary (final metrics, paths) on every rank."""
    env = env or launch_env()
    dp_size = validate_layout(cfg, env.world_size)  # fails before any process group exists
    check_runtime_support(cfg)
    setup_logging(env.rank)
    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.run.seed, env)
    out_dir = run_dir(cfg)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    dist.barrier()
    log.info(
        "world %d = TP %d x PP %d x DP %d | global batch %d = micro %d x DP %d x %d micro-batches",
        env.world_size, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, dp_size,
        cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size,
        cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size),
    )
    from tulip_mega.plan import contrastive_batch_line, make_plan

    log.info("%s", contrastive_batch_line(make_plan(cfg, 1, env.world_size)))

    model = wrap_ddp(build_model(cfg), cfg)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)
    step_fn = TrainStep(cfg, model, optimizer, scheduler, num_micro)
    loader = build_train_loader(
        cfg, parallel_state.get_data_parallel_rank(), dp_size
    ) if step_fn.needs_input else None
    n_params = sum(p.numel() for p in model.parameters())
    log.info("this rank's model stage holds %.2fM parameters", n_params / 1e6)
    speed = _SpeedMeter(cfg, env.world_size, dp_size)
    evaluator = None
    if cfg.eval.interval:
        from tulip_mega.eval.runner import Evaluator

        evaluator = Evaluator(cfg, model)

    ckpt_root = checkpoint_root(cfg)
    start_step = 0
    to_load = None
    if cfg.checkpoint.resume:
        to_load = read_latest(ckpt_root)
        if to_load is None:
            log.info("resume: no checkpoint under %s yet, starting from scratch", ckpt_root)
    if to_load is None and cfg.checkpoint.load:
        to_load = Path(cfg.checkpoint.load)
    if to_load is not None:
        restored = load_checkpoint(
            to_load, model, optimizer, scheduler, loader.state_dict() if loader else None, model_shape(cfg)
        )
        start_step = restored["step"]
        step_fn.completed_steps = start_step
        if loader is not None and restored["loader"] is not None:
            loader.load_state_dict(restored["loader"])
        log.info("resumed from %s at step %d", to_load, start_step)

    metrics_log = MetricsLogger(
        out_dir, cfg.train.steps, enabled=env.rank == 0, tensorboard=cfg.logging.tensorboard, start_step=start_step,
        wandb=make_wandb_sink(cfg, out_dir, env.rank == 0),
    )
    data_iter = TimedIterator(iter(loader)) if loader is not None else None
    straggler = StragglerDetector(cfg.logging.straggler_factor)
    loader_wait = LoaderWait(cfg.logging.loader_wait_warmup_steps, cfg.logging.loader_wait_warn)
    t0 = time.perf_counter()
    t_last, step_last = t0, start_step
    window = {"step_time": 0.0, "data_wait": 0.0, "steps": 0}
    metrics: dict = {}
    last_saved = None
    writer = CheckpointWriter(cfg.checkpoint.async_save)
    deadline = t0 + 60 * cfg.run.max_wall_time_minutes if cfg.run.max_wall_time_minutes else None
    step = start_step
    with PreemptionSignal() as preempt, contextlib.closing(metrics_log):
        while step < cfg.train.steps:
            t_step = time.perf_counter()
            metrics = step_fn(data_iter)
            step_time = time.perf_counter() - t_step
            step += 1
            writer.poll()  # publishes a finished background save (collective)
            window["step_time"] += step_time
            wait = data_iter.pop_wait() if data_iter is not None else 0.0
            window["data_wait"] += wait
            _track_loader_wait(loader_wait, step_time, wait, env.rank)
            window["steps"] += 1
            slow = straggler.update(step, step_time)
            if slow:
                log.warning("rank %d: %s", env.rank, slow)
            eval_now = evaluator is not None and (step % cfg.eval.interval == 0 or step == cfg.train.steps)
            if eval_now:
                metrics.update(evaluator.run())
                _write_eval(out_dir, step, metrics, env.rank)
            if step % cfg.run.log_interval == 0 or step == cfg.train.steps or eval_now:
                now = time.perf_counter()
                eval_seconds = metrics.get("eval/seconds", 0.0) if eval_now else 0.0
                metrics["samples_per_sec"] = (
                    cfg.train.global_batch_size * (step - step_last) / max(now - t_last - eval_seconds, 1e-9)
                )
                metrics.update(speed.metrics(metrics["samples_per_sec"], window, loader))
                metrics["data_wait_fraction"] = metrics["data_wait"] / max(metrics["step_time"], 1e-9)
                window = {"step_time": 0.0, "data_wait": 0.0, "steps": 0}
                metrics.update(writer.take_report())  # checkpoint/save_s, checkpoint/wait_s
                t_last, step_last = now, step
                metrics_log.log(step, metrics, start_step)
            save_now = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
            out_of_time = deadline is not None and time.perf_counter() > deadline
            must_stop = _any_rank(out_of_time or preempt.received is not None)
            if save_now or must_stop or step == cfg.train.steps:
                last_saved = writer.save(
                    ckpt_root, step, model, optimizer, scheduler,
                    loader.state_dict() if loader else None, model_shape(cfg), cfg.checkpoint.keep_last,
                    wait=must_stop or step == cfg.train.steps,
                )
                done = writer.last_published == last_saved
                log.info("%s checkpoint %s", "saved" if done else "saving (in the background)", last_saved)
                t_last = time.perf_counter()  # samples/s measures training, not saving
            if must_stop and step < cfg.train.steps:
                why = "signal" if preempt.received is not None else "wall time" if out_of_time else "another rank"
                log.warning("stopping at step %d (%s) after checkpointing", step, why)
                break
    _log_loader_wait(loader_wait, env.rank)
    log.info("run folder: %s", out_dir.resolve())
    log.info("  metrics:     %s", metrics_log.jsonl_path.resolve())
    if cfg.logging.tensorboard:
        log.info("  tensorboard: %s", metrics_log.tb_dir.resolve())
    if last_saved is not None:
        log.info("  checkpoint:  %s", Path(last_saved).resolve())
    return {
        "step": step,
        "finished": step >= cfg.train.steps,
        "metrics": metrics,
        "run_dir": str(out_dir),
        "checkpoint": str(last_saved) if last_saved else None,
        "loader_wait_fraction": loader_wait.fraction,
    }


def _track_loader_wait(tracker: LoaderWait, step_time: float, wait: float, rank: int) -> None:
    """Add one step; warn (once) when the wait after warm-up passes the threshold."""
    tracker.update(step_time, wait)
    message = tracker.check()
    if message:
        log.warning("rank %d: %s", rank, message)


def _log_loader_wait(tracker: LoaderWait, rank: int) -> None:
    """The end-of-run loader-wait line (a warning above the threshold)."""
    line, bad = tracker.summary()
    if bad:
        log.warning("rank %d: %s", rank, line)
    else:
        log.info("%s", line)


class _SpeedMeter:
    """Throughput, model FLOPs, MFU, memory and data-loader health for the logged metrics.

    Every rank calls `metrics` at the same steps (it runs two small collectives)."""

    def __init__(self, cfg: Config, world_size: int, dp_size: int) -> None:
        contrastive_batch = contrastive_batch_size(cfg, dp_size)
        self.flops = count_flops(cfg, contrastive_batch)
        self.tokens = tokens_per_sample(cfg)
        self.world_size = world_size
        self.peak, peak_note = device_peak(precision_name(cfg))
        # One loader per DP replica counts: its first stage with TP rank 0 (the others are copies).
        self.counts_loader = (parallel_state.is_pipeline_first_stage()
                              and parallel_state.get_tensor_model_parallel_rank() == 0)
        log.info("model FLOPs per sample: %.3f GFLOP forward, %.3f GFLOP training (3x, recompute not counted; "
                 "contrastive batch %d); %d tower tokens per sample; peak: %s",
                 self.flops.forward / 1e9, self.flops.training / 1e9, contrastive_batch, self.tokens, peak_note)

    def metrics(self, samples_per_sec: float, window: dict, loader) -> dict[str, float]:
        steps = max(window["steps"], 1)
        tflops = achieved_tflops(self.flops.training, samples_per_sec, self.world_size)
        out = {
            "tokens_per_sec": samples_per_sec * self.tokens,
            "model_flops_per_sample": float(self.flops.training),
            "tflops_per_device": tflops,
        }
        achieved = mfu(tflops, self.peak)
        if achieved is not None:
            out["mfu"] = achieved
        stats = loader.stats() if (loader is not None and self.counts_loader) else {}
        dev = device()
        totals = torch.tensor([float(stats.get("samples", 0)), float(stats.get("skipped", 0))],
                              dtype=torch.float64, device=dev)
        dist.all_reduce(totals)
        worst = torch.tensor([window["step_time"] / steps, window["data_wait"] / steps, peak_memory_gib()],
                             dtype=torch.float64, device=dev)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        out.update({
            "data/samples": float(totals[0]),
            "data/skipped": float(totals[1]),
            "step_time": float(worst[0]),  # slowest rank, mean over the steps since the last log
            "data_wait": float(worst[1]),  # seconds per step waiting for the loader, slowest rank
            "peak_memory_gib": float(worst[2]),  # largest over ranks
        })
        return out


def _write_eval(out_dir: Path, step: int, metrics: dict, rank: int) -> None:
    if rank != 0:
        return
    from tulip_mega.eval.runner import write_results

    results = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    write_results(out_dir / "eval" / f"step_{step:07d}.json", results, step=step)
    log.info("eval at step %d: %s", step, ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in results.items()))


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (ranks must agree on when to stop)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
