"""The training loop: recipe in, trained checkpoint + metrics out.

`train()` is a short list of named phases, the same order on every rank: resolve the
`RunLayout` with the launch checks (before any process group; `tulip_mega.train` passes the
one it resolved), start the run (logging, process groups, run folder), build (model parts,
DDP, optimizer, scheduler, step, loader, all from the layout), log the start-up facts,
restore a checkpoint if asked, run the steps, finish. After each step three hooks run, one
job each: `EvalHook`, `CheckpointHook`, `PreemptionHook`. Uses megatron-core directly (no
megatron.training globals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tulip_mega.config import Config, save_config
from tulip_mega.config.run_layout import RunLayout
from tulip_mega.convert.pretrained import load_pretrained
from tulip_mega.launch import check_launch
from tulip_mega.models.build import build_model_chunks
from tulip_mega.models.megatron_config import LayerChoices, layer_choices, startup_lines
from tulip_mega.eval.runner import Evaluator, write_results
from tulip_mega.models.specs import use_transformer_engine
from tulip_mega.parallel.init import LaunchEnv, compute_dtype, device, init_parallel, launch_env, use_cuda
from tulip_mega.training.async_checkpoint import CheckpointWriter
from tulip_mega.training.checkpoint import load_checkpoint, model_shape, read_latest
from tulip_mega.training.data import build_train_loader, caption_pad_id, mixture_names
from tulip_mega.training.host_cpus import log_host_cpus
from tulip_mega.flops import (contrastive_batch_line, count_flops, embedding_cache_flops, model_flops_between,
                              tokens_per_sample)
from tulip_mega.training.metrics import DEBUG_LOG_NAME, MetricsLogger, setup_logging
from tulip_mega.training.plateau import PlateauWatch
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


def train(cfg: Config, env: Optional[LaunchEnv] = None, stop_signal: Optional[PreemptionSignal] = None,
          layout: Optional[RunLayout] = None) -> dict:
    """Train per the recipe; returns a summary (final metrics, paths) on every rank.

    `stop_signal`: the run's stop-signal record, installed by the caller before its own start-up
    (`tulip_mega.train.main` does); without one, one is installed here for the whole call.
    `layout`: the run's layout from `tulip_mega.launch.check_launch` for this world size;
    resolved here when None."""
    if stop_signal is None:
        with PreemptionSignal() as own:
            return train(cfg, env, own, layout)
    env = env or launch_env()
    layout = layout or check_launch(cfg, env.world_size)
    if layout.world_size != env.world_size:
        raise ValueError(f"train: the layout is for {layout.world_size} processes, the launch has {env.world_size}")
    out_dir = _start_run(cfg, env, layout)
    run = _build(cfg, layout)
    _log_startup_facts(cfg, run, out_dir)
    log_host_cpus(cfg, layout, env.rank, run.loader, use_cuda())
    start_step = _restore(cfg, run)
    hooks = _Hooks(
        evaluation=EvalHook(cfg, run.model, out_dir, env.rank) if cfg.eval.interval else None,
        checkpoint=CheckpointHook(cfg, run),
        preemption=PreemptionHook(cfg, stop_signal),
    )
    step, metrics, metrics_log, loader_wait = _run_steps(cfg, env, run, start_step, out_dir, hooks)
    return _finish(cfg, env, out_dir, step, metrics, metrics_log, loader_wait, hooks.checkpoint.last_saved)


# --- phases of train() ---------------------------------------------------------------------
def _start_run(cfg: Config, env: LaunchEnv, layout: RunLayout) -> Path:
    """Logging (console + the run folder's debug.log), process groups, the run folder with
    the resolved config."""
    out_dir = run_dir(cfg)
    setup_logging(env.rank, debug_log=out_dir / DEBUG_LOG_NAME)
    init_parallel(layout.tensor_parallel, layout.pipeline_parallel, cfg.run.seed, env,
                  virtual_pipeline=layout.virtual_pipeline)
    if env.rank == 0:
        save_config(cfg, out_dir / "config.yaml")
    dist.barrier()
    return out_dir


@dataclasses.dataclass
class _Run:
    """What one rank trains with: the layout, its model parts (in DDP), optimizer, scheduler,
    step and loader."""

    layout: RunLayout
    model: list  # DDP model parts, one per virtual stage
    optimizer: Any
    scheduler: Any
    step_fn: TrainStep
    loader: Any
    use_te: bool
    choices: LayerChoices  # which blocks run FP8, the GPU switches (models/megatron_config.py)


def _build(cfg: Config, layout: RunLayout) -> _Run:
    """The model parts, optimizer, scheduler, train step and loader of the layout."""
    use_te = use_transformer_engine(cfg.model.transformer_impl)
    choices = layer_choices(cfg, use_te, layout)
    parts = build_model_chunks(cfg, layout, use_te=use_te, choices=choices)
    for part in parts:
        load_pretrained(part, cfg.model)
    model = wrap_ddp(parts, cfg)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    step_fn = TrainStep(cfg, layout, model, optimizer, scheduler, pad_id=caption_pad_id(cfg))
    loader = build_train_loader(cfg, layout, parallel_state.get_data_parallel_rank()) if step_fn.needs_input else None
    return _Run(layout, model, optimizer, scheduler, step_fn, loader, use_te, choices)


def _log_startup_facts(cfg: Config, run: _Run, out_dir: Path) -> None:
    """One line per fact on rank 0 (other ranks log warnings only)."""
    lay, tr = run.layout, cfg.train
    n_params = sum(p.numel() for chunk in run.model for p in chunk.parameters())
    v, t = cfg.model.vision, cfg.model.text
    flops = count_flops(cfg, lay.streams, lay.contrastive_batch)
    cache = embedding_cache_flops(cfg, lay)
    loader = type(run.loader).__name__ if run.loader is not None else "none on this rank"
    for line in (
        f"layout: world {lay.world_size} = TP {lay.tensor_parallel} x PP {lay.pipeline_parallel} x DP "
        f"{lay.data_parallel}"
        + (f", {lay.virtual_pipeline} interleaved virtual stages per PP rank" if lay.virtual_pipeline > 1 else ""),
        f"batch: global {tr.global_batch_size} = micro {tr.micro_batch_size} x DP {lay.data_parallel} x "
        f"{lay.microbatches} micro-batches",
        contrastive_batch_line(cfg.loss.contrastive_batch, lay.contrastive_batch, lay.microbatches, cache,
                               flops.training),
        f"model {cfg.model.size}: vision {v.num_layers}L h{v.hidden_size}, text {t.num_layers}L h{t.hidden_size}; "
        f"{n_params / 1e6:.2f}M parameters in rank 0's stage",
        f"backend: {'nccl on CUDA' if use_cuda() else 'gloo on CPU'}, dtype {compute_dtype(cfg.precision.dtype)}",
        f"layers: {'Transformer Engine' if run.use_te else 'megatron-core local'} "
        f"(model.transformer_impl={cfg.model.transformer_impl})",
        *startup_lines(cfg, run.choices, run.model[0].ddp_config.bucket_size),
        f"loader: {loader}",
        f"run folder: {out_dir.resolve()} (debug log: {DEBUG_LOG_NAME})",
    ):
        log.info("%s", line)


def _restore(cfg: Config, run: _Run) -> int:
    """Load the newest checkpoint (checkpoint.resume) or checkpoint.load; returns the step."""
    ckpt_root = checkpoint_root(cfg)
    to_load = None
    if cfg.checkpoint.resume:
        to_load = read_latest(ckpt_root)
        if to_load is None:
            log.info("resume: no checkpoint under %s yet, starting from scratch", ckpt_root)
    if to_load is None and cfg.checkpoint.load:
        to_load = Path(cfg.checkpoint.load)
    if to_load is None:
        return 0
    loader = run.loader
    restored = load_checkpoint(
        to_load, run.model, run.optimizer, run.scheduler, loader.state_dict() if loader else None, model_shape(cfg)
    )
    start_step = restored["step"]
    run.step_fn.completed_steps = start_step
    if loader is not None and restored["loader"] is not None:
        loader.load_state_dict(restored["loader"])
    log.info("resumed from %s at step %d", to_load, start_step)
    return start_step


def _run_steps(cfg: Config, env: LaunchEnv, run: _Run, start_step: int, out_dir: Path, hooks: "_Hooks"):
    """Step until train.steps (or a stop); after each step: timing, eval, logging,
    checkpoint, stop. Returns (step, last metrics, metrics logger, loader-wait tracker)."""
    watch = _StepWatch(cfg, env.rank, run, start_step)
    metrics_log = MetricsLogger(
        out_dir, cfg.train.steps, enabled=env.rank == 0, tensorboard=cfg.logging.tensorboard, start_step=start_step,
        wandb=make_wandb_sink(cfg, out_dir, env.rank == 0),
    )
    metrics: dict = {}
    step = start_step
    with contextlib.closing(metrics_log):
        if step < cfg.train.steps and hooks.preemption.must_stop()[0]:
            # A stop during start-up (model build, restore): stop before the first step, without
            # a save. The state here is what the next run rebuilds anyway (the checkpoint just
            # restored, checkpoint.load, or the seeded init), and the minutes left before the
            # kill are better not spent writing a copy of it.
            log.warning("stopping before step %d (stop requested during start-up); nothing to save", step + 1)
            return step, metrics, metrics_log, watch.loader_wait
        while step < cfg.train.steps:
            t_step = time.perf_counter()
            metrics = run.step_fn(watch.data_iter)
            step_time = time.perf_counter() - t_step
            step += 1
            watch.check_plateau(step, metrics)  # metrics are global: the same on every rank
            hooks.checkpoint.poll()  # publishes a finished background save (collective)
            watch.add(step, step_time)
            eval_now = hooks.evaluation is not None and hooks.evaluation(step, metrics)
            if step % cfg.run.log_interval == 0 or step == cfg.train.steps or eval_now:
                watch.report(step, metrics, eval_now)
                metrics.update(hooks.checkpoint.take_report())  # checkpoint/save_s, checkpoint/wait_s
                metrics_log.log(step, metrics, start_step)
            must_stop, why = hooks.preemption.must_stop()
            if hooks.checkpoint(step, force=must_stop):
                watch.t_last = time.perf_counter()  # samples/s measures training, not saving
            if must_stop and step < cfg.train.steps:
                log.warning("stopping at step %d (%s) after checkpointing", step, why)
                break
    return step, metrics, metrics_log, watch.loader_wait


class _StepWatch:
    """Per-step timing and health between two logged steps: step and loader-wait seconds,
    stragglers, loader-wait warnings, loss plateaus, and the throughput metrics of a log."""

    def __init__(self, cfg: Config, rank: int, run: _Run, start_step: int) -> None:
        self.cfg, self.rank, self.loader = cfg, rank, run.loader
        self.speed = _SpeedMeter(cfg, run.layout)
        self.data_iter = TimedIterator(iter(run.loader)) if run.loader is not None else None
        self.straggler = StragglerDetector(cfg.logging.straggler_factor)
        self.loader_wait = LoaderWait(cfg.logging.loader_wait_warmup_steps, cfg.logging.loader_wait_warn)
        self.plateau = PlateauWatch(cfg.optim.warmup_steps, cfg.logging.plateau_steps)
        self.t_last, self.step_last = time.perf_counter(), start_step
        self.window = _Window()

    def check_plateau(self, step: int, metrics: dict) -> None:
        for warning in self.plateau.update(step, metrics):
            if self.rank == 0:
                log.warning(warning)

    def add(self, step: int, step_time: float) -> None:
        """One step's time and loader wait; warns about a straggler or a slow loader."""
        wait = self.data_iter.pop_wait() if self.data_iter is not None else 0.0
        self.window.step_time += step_time
        self.window.data_wait += wait
        _track_loader_wait(self.loader_wait, step_time, wait, self.rank)
        self.window.steps += 1
        slow = self.straggler.update(step, step_time)
        if slow:
            log.warning("rank %d: %s", self.rank, slow)

    def report(self, step: int, metrics: dict, eval_now: bool) -> None:
        """Adds samples/s (eval time excluded) and the throughput metrics since the last
        report to `metrics`, and starts a new window (collective: every rank calls it)."""
        now = time.perf_counter()
        eval_seconds = metrics.get("eval/seconds", 0.0) if eval_now else 0.0
        metrics["samples_per_sec"] = (
            self.cfg.train.global_batch_size * (step - self.step_last) / max(now - self.t_last - eval_seconds, 1e-9)
        )
        metrics.update(self.speed.metrics(metrics["samples_per_sec"], self.window, self.loader, self.step_last, step))
        metrics["data_wait_fraction"] = metrics["data_wait"] / max(metrics["step_time"], 1e-9)
        self.window = _Window()
        self.t_last, self.step_last = now, step


@dataclasses.dataclass
class _Window:
    """Step and loader-wait seconds summed over the steps since the last logged step."""

    step_time: float = 0.0
    data_wait: float = 0.0
    steps: int = 0


def _finish(cfg: Config, env: LaunchEnv, out_dir: Path, step: int, metrics: dict, metrics_log, loader_wait,
            last_saved) -> dict:
    """The closing log lines and the summary every rank returns."""
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


# --- hooks: one job each -----------------------------------------------------------------------
class EvalHook:
    """Evaluates every eval.interval steps and at the last step; writes eval/step_N.json."""

    def __init__(self, cfg: Config, parts: list, out_dir: Path, rank: int) -> None:
        self.interval, self.last = cfg.eval.interval, cfg.train.steps
        self.evaluator = Evaluator(cfg, parts)
        self.out_dir, self.rank = out_dir, rank

    def __call__(self, step: int, metrics: dict) -> bool:
        """Adds the eval metrics to `metrics`; True when it evaluated at this step."""
        if not (step % self.interval == 0 or step == self.last):
            return False
        metrics.update(self.evaluator.run())
        _write_eval(self.out_dir, step, metrics, self.rank)
        return True


class CheckpointHook:
    """Saves every checkpoint.interval steps, at the last step, and when told to (a stop)."""

    def __init__(self, cfg: Config, run: _Run) -> None:
        self.root, self.interval, self.keep_last = checkpoint_root(cfg), cfg.checkpoint.interval, cfg.checkpoint.keep_last
        self.last_step, self.fingerprint, self.run = cfg.train.steps, model_shape(cfg), run
        self.last_saved: Optional[Path] = None
        # checkpoint.async_save: the write runs in the background and is published (renamed,
        # `latest` moved) only once every rank's writer is done; see training/async_checkpoint.py.
        self.writer = CheckpointWriter(cfg.checkpoint.async_save)

    def __call__(self, step: int, force: bool = False) -> bool:
        """True when it started a save at this step. A forced save (a stop) and the last step's
        save are waited for, so the run never exits with a checkpoint half written."""
        due = self.interval and step % self.interval == 0
        if not (due or force or step == self.last_step):
            return False
        r = self.run
        self.last_saved = self.writer.save(
            self.root, step, r.model, r.optimizer, r.scheduler,
            r.loader.state_dict() if r.loader else None, self.fingerprint, self.keep_last,
            wait=force or step == self.last_step,
        )
        done = self.writer.last_published == self.last_saved
        log.info("%s checkpoint %s", "saved" if done else "saving (in the background)", self.last_saved)
        return True

    def poll(self) -> None:
        """Publish a background save that has finished (a collective: every rank calls it)."""
        self.writer.poll()

    def take_report(self) -> dict[str, float]:
        """checkpoint/save_s and checkpoint/wait_s since the last report."""
        return self.writer.take_report()


class PreemptionHook:
    """Whether every rank must stop now: a stop signal on any rank or run.max_wall_time_minutes."""

    def __init__(self, cfg: Config, stop_signal: PreemptionSignal) -> None:
        minutes = cfg.run.max_wall_time_minutes
        self.deadline = time.perf_counter() + 60 * minutes if minutes else None
        self.signal = stop_signal  # installed for the whole run, before the model was built

    def must_stop(self) -> tuple[bool, str]:
        """(stop, why), the same on every rank (one all-reduce)."""
        out_of_time = self.deadline is not None and time.perf_counter() > self.deadline
        received = self.signal.received is not None
        if not _any_rank(out_of_time or received):
            return False, ""
        return True, "signal" if received else "wall time" if out_of_time else "another rank"


@dataclasses.dataclass
class _Hooks:
    evaluation: Optional[EvalHook]
    checkpoint: CheckpointHook
    preemption: PreemptionHook


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

    def __init__(self, cfg: Config, layout: RunLayout) -> None:
        self.cfg, self.layout = cfg, layout
        self.flops = count_flops(cfg, layout.streams, layout.contrastive_batch)
        self.tokens = tokens_per_sample(cfg, layout.streams)
        self.world_size = layout.world_size
        self.peak, peak_note = device_peak(precision_name(cfg))
        # One loader per DP replica counts: its first stage with TP rank 0 (the others are copies).
        self.mixture_names = mixture_names(cfg)  # per-dataset counters of a mixture
        self.counts_loader = (parallel_state.is_pipeline_first_stage()
                              and parallel_state.get_tensor_model_parallel_rank() == 0)
        log.info("model FLOPs per sample: %.3f GFLOP forward, %.3f GFLOP training (3x, recompute not counted); "
                 "%d tower tokens per sample; peak: %s",
                 self.flops.forward / 1e9, self.flops.training / 1e9, self.tokens, peak_note)

    def metrics(self, samples_per_sec: float, window: _Window, loader, first: int, last: int) -> dict[str, float]:
        """The window's metrics; `first`, `last`: completed steps at its start and end (the
        model FLOPs per sample change when the EMA teacher starts)."""
        steps = max(window.steps, 1)
        model_flops = model_flops_between(self.cfg, self.layout, first, last)
        tflops = achieved_tflops(model_flops, samples_per_sec, self.world_size)
        out = {
            "tokens_per_sec": samples_per_sec * self.tokens,
            "model_flops_per_sample": model_flops,
            "tflops_per_device": tflops,
        }
        achieved = mfu(tflops, self.peak)
        if achieved is not None:
            out["mfu"] = achieved
        stats = loader.stats() if (loader is not None and self.counts_loader) else {}
        dev = device()
        counted = ["samples", "skipped"] + [f"{kind}/{name}" for name in self.mixture_names
                                            for kind in ("samples", "skipped")]
        totals = torch.tensor([float(stats.get(k, 0)) for k in counted], dtype=torch.float64, device=dev)
        dist.all_reduce(totals)
        worst = torch.tensor([window.step_time / steps, window.data_wait / steps, peak_memory_gib()],
                             dtype=torch.float64, device=dev)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        out.update({
            # Every counter over the DP replicas, per mixture dataset too (data/samples/<name>).
            **{f"data/{k}": float(v) for k, v in zip(counted, totals.tolist())},
            "step_time": float(worst[0]),  # slowest rank, mean over the steps since the last log
            "data_wait": float(worst[1]),  # seconds per step waiting for the loader, slowest rank
            "peak_memory_gib": float(worst[2]),  # largest over ranks
        })
        return out


def _write_eval(out_dir: Path, step: int, metrics: dict, rank: int) -> None:
    if rank != 0:
        return
    results = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    write_results(out_dir / "eval" / f"step_{step:07d}.json", results, step=step)
    log.info("eval at step %d: %s", step, ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in results.items()))


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (ranks must agree on when to stop)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
