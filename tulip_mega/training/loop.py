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
from tulip_mega.training.checkpoint import load_checkpoint, read_latest, save_checkpoint
from tulip_mega.training.data import build_train_loader
from tulip_mega.training.metrics import MetricsLogger, setup_logging
from tulip_mega.training.signals import PreemptionSignal
from tulip_mega.training.step import TrainStep, make_optimizer, make_scheduler, wrap_ddp

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
        out_dir, cfg.train.steps, enabled=env.rank == 0, tensorboard=cfg.logging.tensorboard, start_step=start_step
    )
    data_iter = iter(loader) if loader is not None else None
    t0 = time.perf_counter()
    t_last, step_last = t0, start_step
    metrics: dict = {}
    last_saved = None
    deadline = t0 + 60 * cfg.run.max_wall_time_minutes if cfg.run.max_wall_time_minutes else None
    step = start_step
    with PreemptionSignal() as preempt, contextlib.closing(metrics_log):
        while step < cfg.train.steps:
            metrics = step_fn(data_iter)
            step += 1
            if step % cfg.run.log_interval == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                metrics["samples_per_sec"] = cfg.train.global_batch_size * (step - step_last) / (now - t_last)
                t_last, step_last = now, step
                metrics_log.log(step, metrics, start_step)
            save_now = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
            out_of_time = deadline is not None and time.perf_counter() > deadline
            must_stop = _any_rank(out_of_time or preempt.received is not None)
            if save_now or must_stop or step == cfg.train.steps:
                last_saved = save_checkpoint(
                    ckpt_root, step, model, optimizer, scheduler,
                    loader.state_dict() if loader else None, model_shape(cfg), cfg.checkpoint.keep_last,
                )
                log.info("saved checkpoint %s", last_saved)
                t_last = time.perf_counter()  # samples/s measures training, not saving
            if must_stop and step < cfg.train.steps:
                why = "signal" if preempt.received is not None else "wall time" if out_of_time else "another rank"
                log.warning("stopping at step %d (%s) after checkpointing", step, why)
                break
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
    }


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (ranks must agree on when to stop)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
