"""Helpers for multi-process tests: deterministic batches, one training step under any layout,
and reassembly of full (unsharded) gradients/weights from every rank's shards.

Worker functions are module-level so `run_distributed` can pickle them into spawned ranks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch
import torch.distributed as dist

from tulip_mega.data.base import Batch
from tulip_mega.config import load_config
from tulip_mega.config.schema import Config

DEBUG = [
    "model.size=debug",
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "train.steps=4",
    "optim.warmup_steps=0",
    "optim.lr=1e-3",
]


def make_cfg(overrides: Sequence[str]) -> Config:
    return load_config(None, DEBUG + list(overrides))


def global_batches(cfg: Config, steps: int, seed: int = 0,
                   caption_lengths: Optional[Sequence[int]] = None) -> list[Batch]:
    """`steps` global batches of random images and captions (the same on every rank), with
    every extra field the recipe's loss terms need (input_streams); GeCo validity masks are
    random, so missing fields (ignored pairs) are exercised too.

    Every text (caption, paraphrase, negative, EDA caption) is laid out as the tokenizer
    encodes it (tulip_mega/data/tokenizer.py): ids, eos, then pad up to the context, with its
    length (eos included) drawn per text from 1..context, so the towers, the pairwise text
    terms and the caption decoder all see padding and captions of mixed length.
    `caption_lengths` fixes the captions' lengths instead (one per sample of a global batch)."""
    from tulip_mega.data.tokenizer import EOS_ID, PAD_ID
    from tulip_mega.config.streams import input_streams

    g = torch.Generator().manual_seed(seed)
    s = input_streams(cfg)
    n, size, L = cfg.train.global_batch_size, cfg.model.vision.image_size, cfg.model.text.context_length

    def images(*lead: int, side: int = size) -> torch.Tensor:
        return torch.randn(*lead, 3, side, side, generator=g)

    def tokens(*lead: int, lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
        ids = torch.randint(3, 200, (*lead, L), generator=g)
        if lengths is None:
            length = torch.randint(1, L + 1, (*lead, 1), generator=g)
        else:
            length = torch.tensor(list(lengths)).reshape(*lead, 1)
        pos = torch.arange(L)
        ids = torch.where(pos == length - 1, torch.tensor(EOS_ID), ids)
        return torch.where(pos >= length, torch.tensor(PAD_ID), ids)

    def valid(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) < 0.75

    out = []
    for _ in range(steps):
        b = Batch(images=images(n), tokens=tokens(n, lengths=caption_lengths), keys=[f"s{len(out)}-{i}" for i in range(n)])
        if s.loader_crops:
            b.crops = images(n, s.loader_crops)
        if s.local_crops:
            b.local_crops = images(n, s.local_crops, side=s.local_size)
        if s.geco_edits:
            b.edits, b.edit_valid = images(n, 2), valid(n, 2)
        if s.paraphrases:
            b.paraphrases, b.paraphrase_valid = tokens(n, s.paraphrases), valid(n, s.paraphrases)
        if s.negatives:
            b.negatives, b.negative_valid = tokens(n, s.negatives), valid(n, s.negatives)
        if s.eda_caption:
            b.eda_tokens = tokens(n)
        if s.locca_regions:
            r = s.locca_regions
            corners = torch.rand(n, r, 2, 2, generator=g).sort(dim=2).values  # [n, r, (lo, hi), (x, y)]
            b.region_boxes = torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1)  # x0, y0, x1, y1
            b.region_tokens, b.region_valid = tokens(n, r), valid(n, r)
            b.region_valid[: max(1, n // 8)] = False  # some samples without any region
        out.append(b)
    return out


def rank_microbatches(cfg: Config, batches: list[Batch], dp_rank: int, dp_size: int):
    """This DP rank's micro-batches, in megatron's order: rank r owns rows [r*B/dp, (r+1)*B/dp)."""
    per_rank = cfg.train.global_batch_size // dp_size
    mb = cfg.train.micro_batch_size
    for b in batches:
        lo = dp_rank * per_rank
        for m in range(lo, lo + per_rank, mb):
            yield b.slice(m, m + mb)


def _shard_entries(model, attr: str) -> list[tuple]:
    """(key, layer_index, offsets, local tensor) for every parameter's value or main_grad."""
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

    from tulip_mega.models.init import _iter_sharded

    params = {p.data_ptr(): p for p in model.parameters()}
    out = []
    for sh in _iter_sharded(extract_sharded_tensors(model.sharded_state_dict())[0]):
        p = params.get(sh.data.data_ptr())
        if p is None or (attr != "data" and not p.requires_grad):  # the frozen EMA teacher has no gradient
            continue
        k = sh.prepend_axis_num
        value = p.data if attr == "data" else p.main_grad
        out.append((sh.key, tuple(sh.global_offset[:k]), tuple(sh.global_offset[k:]),
                    tuple(sh.global_shape[k:]), value.detach().clone().float().reshape(sh.local_shape)))
    return out


def _chunk_entries(modules, attr: str) -> list[tuple]:
    """_shard_entries of every model chunk of this rank (one chunk without interleaving)."""
    return [e for m in modules for e in _shard_entries(m, attr)]


def stack_layers(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """assemble()'s 'key[layer]' tensors -> megatron's layer-stacked 'key' tensors (what the
    converters in tulip_mega.convert read and write)."""
    import re

    stacked: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, t in full.items():
        m = re.fullmatch(r"(.*)\[(\d+)\]", name)
        if m:
            stacked.setdefault(m.group(1), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for key, layers in stacked.items():
        out[key] = torch.stack([layers[i] for i in range(len(layers))])
    return out


def assemble(per_rank_entries: list[list[tuple]]) -> dict[str, torch.Tensor]:
    """Full tensors keyed 'key[layer]' from the shards reported by all ranks."""
    full: dict[str, torch.Tensor] = {}
    for entries in per_rank_entries:
        for key, layer, offsets, shape, local in entries:
            name = f"{key}{list(layer) if layer else ''}"
            t = full.setdefault(name, torch.full(shape, float("nan")))
            t[tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))] = local
    for name, t in full.items():
        assert not torch.isnan(t).any(), f"{name} not fully covered by the shards"
    return full


def assert_same_step(out: list[dict], ref: list[dict], loss_rtol: float, grad_rtol: float) -> dict[str, torch.Tensor]:
    """A layout's step (step_worker results) equals the reference layout's: every loss term within
    `loss_rtol`, every assembled gradient within `grad_rtol` of its largest entry. Returns the
    reference gradients (name -> full tensor) for further checks."""
    for name in ref[0]["metrics"]:
        if name.startswith("loss"):
            assert out[0]["metrics"][name] == pytest.approx(ref[0]["metrics"][name], rel=loss_rtol), name
    R = assemble([r["entries"] for r in ref])
    G = assemble([r["entries"] for r in out])
    assert set(G) == set(R), f"parameter sets differ: {sorted(set(G) ^ set(R))}"
    bad = {}
    for k in R:
        assert G[k].shape == R[k].shape, k
        err = ((G[k] - R[k]).abs().max() / R[k].abs().max().clamp_min(1e-8)).item()
        if err > grad_rtol:
            bad[k] = err
    assert not bad, f"gradients differ from the reference layout: {bad}"
    # The norm megatron logs and clips by: every shard once, on any layout.
    true_norm = sum(float(t.double().pow(2).sum()) for t in R.values()) ** 0.5
    for r in out + ref:
        if r.get("grad_norm") is not None:
            assert r["grad_norm"] == pytest.approx(true_norm, rel=1e-5), f"rank {r['rank']}: grad_norm"
    return R


def assert_same_training(out: list[dict], ref: list[dict], loss_rtol: float = 1e-4, weight_atol: float = 1e-4) -> None:
    """Two step_worker(..., optimizer_steps=True) runs trained alike: the reference's loss fell,
    every step's loss and every final weight agree. Float32 reduction-order differences grow
    through Adam, hence the (measured, per test) bounds."""
    import pytest

    assert ref[0]["losses"][-1] < ref[0]["losses"][0], "the reference did not train"
    for a, b in zip(out[0]["losses"], ref[0]["losses"]):
        assert a == pytest.approx(b, rel=loss_rtol)
    R = assemble([r["entries"] for r in ref])
    W = assemble([r["entries"] for r in out])
    for k in R:
        torch.testing.assert_close(W[k], R[k], rtol=0, atol=weight_atol, msg=k)


def build_train_step(overrides: Sequence[str]):
    """(cfg, DDP model, optimizer, scheduler, TrainStep) for the debug size plus `overrides`,
    initialising parallel state on first use (a worker may build several models)."""
    from megatron.core import parallel_state

    from tulip_mega.convert.pretrained import load_pretrained
    from tulip_mega.launch import resolve_layout
    from tulip_mega.models.build import build_model_chunks
    from tulip_mega.parallel.init import init_parallel
    from tulip_mega.training.optimizer import make_optimizer, make_scheduler
    from tulip_mega.training.data import caption_pad_id
    from tulip_mega.training.step import TrainStep, wrap_ddp

    cfg = make_cfg(list(overrides))
    if not parallel_state.model_parallel_is_initialized():
        init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.run.seed,
                      virtual_pipeline=cfg.parallel.virtual_pipeline)
    layout = resolve_layout(cfg, dist.get_world_size())
    chunks = build_model_chunks(cfg, layout)
    for chunk in chunks:
        load_pretrained(chunk, cfg.model)
    model = wrap_ddp(chunks, cfg)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    return cfg, model, optimizer, scheduler, TrainStep(cfg, layout, model, optimizer, scheduler,
                                                           pad_id=caption_pad_id(cfg))


def step_worker(overrides: Sequence[str], steps: int = 1, optimizer_steps: bool = False,
                caption_lengths: Optional[Sequence[int]] = None) -> dict:
    """Run `steps` training steps; report losses, and full-gradient shards and megatron's
    global gradient norm of the last step (or, with optimizer_steps, the weights after the
    last step). `caption_lengths`: see global_batches."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    initial = _chunk_entries(step.modules, "data")
    dp_size = parallel_state.get_data_parallel_world_size()
    it = rank_microbatches(cfg, global_batches(cfg, steps, caption_lengths=caption_lengths), parallel_state.get_data_parallel_rank(), dp_size)
    probe = _probe_first_vision_layer(step.modules[0])
    losses, metrics = [], {}
    for i in range(steps):
        if optimizer_steps or i < steps - 1:
            metrics = step(it)
        else:
            # Last step: forward+backward only, so the gradients are still there to compare.
            metrics = step.forward_backward(it)
        losses.append(metrics["loss"])
    grad_norm = None
    if not optimizer_steps:  # what the trainer logs and clips by: megatron's norm over all ranks
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
    return {
        "rank": dist.get_rank(),
        "losses": losses,
        "metrics": metrics,
        "grad_norm": grad_norm,
        "entries": _chunk_entries(step.modules, "data" if optimizer_steps else "grad"),
        "initial": initial,
        "probe": probe,
    }


def _probe_first_vision_layer(module) -> dict:
    """Count forward calls of the first vision layer's MLP and core attention and record the
    layer's input shape: proves recompute re-runs them and sequence parallel splits the sequence."""
    probe = {"mlp_calls": 0, "core_attn_calls": 0, "layer_input_shape": None}
    if not len(module.vision_block.layers):  # a pipeline split may leave a stage without vision layers
        return probe
    layer = module.vision_block.layers[0]

    def count(name):
        def hook(_mod, _inp, _out):
            probe[name] += 1
        return hook

    layer.mlp.register_forward_hook(count("mlp_calls"))
    layer.self_attention.core_attention.register_forward_hook(count("core_attn_calls"))
    layer.register_forward_pre_hook(
        lambda _m, args, kwargs: probe.__setitem__("layer_input_shape", tuple(
            (args[0] if args else kwargs["hidden_states"]).shape)), with_kwargs=True)
    return probe


def kill_mid_second_shard(argv: Sequence[str], out_dir, shard_names: Sequence[str], timeout: float = 60.0) -> None:
    """Run ``argv`` (a GeCo shard loop writing ``shard_names`` into ``out_dir``) and SIGKILL it
    once shard 0 is complete and shard 1 is half written (its ``.partial`` exists)."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    out = Path(out_dir)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(list(argv), env={**os.environ, "PYTHONPATH": repo}, cwd=repo, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ((out / shard_names[0]).exists() and (out / (shard_names[1] + ".partial")).exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "worker ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not any((out / n).exists() for n in shard_names[1:]), "a shard after the kill point was completed"


def train_and_save_worker(overrides: Sequence[str], root: str, steps: int, kill_marker: str, load: str) -> dict:
    """Train to `steps` (after loading `load`, if given), saving asynchronously after every
    step. With a kill marker: after scheduling the last step's save, write the marker and wait
    to be killed (that save stays unpublished: it is only published at the next poll).
    Returns every step's metrics and losses."""
    import time
    import warnings
    from pathlib import Path

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from tulip_mega.training.async_checkpoint import CheckpointWriter
    from tulip_mega.training.checkpoint import load_checkpoint

    shape = {"test": 1}
    cfg, model, opt, sched, step = build_train_step(overrides)
    it = rank_microbatches(cfg, global_batches(cfg, steps), parallel_state.get_data_parallel_rank(),
                           parallel_state.get_data_parallel_world_size())
    start = 0
    if load:
        start = load_checkpoint(Path(load), model, opt, sched, None, shape)["step"]
        step.completed_steps = start
        for _ in range(start * step.num_microbatches):
            next(it)  # the data this run already consumed
    writer = CheckpointWriter(True)
    metrics = []
    for s in range(start + 1, steps + 1):
        metrics.append(step(it))
        writer.poll()
        writer.save(Path(root), s, model, opt, sched, None, shape, keep_last=5)
        if kill_marker and s == steps:
            dist.barrier()
            if dist.get_rank() == 0:
                Path(kill_marker).write_text(str(s))
            time.sleep(600)
    writer.close()
    return {"metrics": metrics, "losses": [m["loss"] for m in metrics]}


def load_tensors_worker(checkpoint: str) -> dict:
    """Every tensor of a checkpoint (weights, optimizer state, buffers), unsharded."""
    from megatron.core import dist_checkpointing

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(checkpoint).items() if torch.is_tensor(v)}


KILL_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}]
from harness import train_and_save_worker
from tulip_mega.parallel.spawn import run_distributed
if __name__ == "__main__":
    run_distributed(train_and_save_worker, 2, {overrides!r}, {root!r}, {steps!r}, {marker!r}, "")
"""


def run_script_and_kill_at_marker(script, marker, timeout: float = 300.0) -> None:
    """Run the Python `script` (its own session, the repo on PYTHONPATH) until it writes the file
    `marker`, then SIGKILL its whole process group: the launcher, every rank, any writer."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(script)], cwd=repo, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not Path(marker).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_all(spec: str) -> dict[str, dict]:
    """Every sample of the shards of ``spec`` by key (read with shards.iter_samples)."""
    from tulip_mega.data.shards import expand_shards, iter_samples

    return {s["__key__"]: s for shard in expand_shards(spec) for s in iter_samples(shard)}


def background_labels(data_dir, pattern: str) -> dict[str, int]:
    """key -> index in synthetic.BACKGROUNDS of every sample in the shards data_dir/pattern (from each
    sample's json metadata): the class a debug model learns first, for zero-shot / probe tests."""
    import json
    from pathlib import Path

    from tulip_mega.data.shards import iter_samples
    from tulip_mega.datagen.synthetic import BACKGROUNDS

    labels = {}
    for shard in sorted(Path(data_dir).glob(pattern)):
        for sample in iter_samples(str(shard)):
            labels[sample["__key__"]] = BACKGROUNDS.index(json.loads(sample["json"])["background"])
    return labels
