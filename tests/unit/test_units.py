"""Fast unit tests: launcher environment, pipeline activation packing, CPU compatibility guard."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tulip_mega.models.packing import ActivationPacker, PackedPart
from tulip_mega.parallel.init import first_slurm_host, launch_env


@pytest.mark.parametrize(
    "nodelist,host",
    [("gpu[001-004,010]", "gpu001"), ("node7", "node7"), ("a[3,5],b[1-2]", "a3"), ("h100-[12-13]", "h100-12")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_launch_env_torchrun_slurm_single():
    t = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port, t.launcher) == (3, 8, 1, "n1", 1234, "torchrun")
    s = launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[004-005]", "SLURM_JOB_ID": "777"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.launcher) == (9, 16, 1, "gpu004", "slurm")
    assert s.master_port == 20777
    one = launch_env({})
    assert (one.rank, one.world_size, one.launcher) == (0, 1, "single")


@pytest.mark.parametrize("hv,ht", [(64, 64), (64, 48), (96, 64), (96, 50)])
def test_packing_round_trip(hv, ht):
    p = ActivationPacker((PackedPart("global", 5, 3, hv), PackedPart("mae", 2, 1, hv), PackedPart("text", 3, 4, ht)),
                         width=hv)
    parts = {"global": torch.randn(5, 3 * 2, hv), "mae": torch.randn(2, 2, hv), "text": torch.randn(3, 4 * 2, ht)}
    packed = p.pack(parts)
    # megatron's default p2p shape: rows of the vision width, padded up to a whole row
    assert packed.shape == p.shape(2) == (-(-(5 * 3 * hv + 2 * hv + 3 * 4 * ht) // hv), 2, hv)
    assert packed._base is None, "megatron deallocates pipeline outputs: the packed tensor must not be a view"
    back = p.unpack(packed)
    for name, x in parts.items():
        assert torch.equal(back[name], x), name
    # The micro-batch stays the middle axis: sample i of every part lives in packed[:, i].
    one = p.unpack(packed[:, 1:2].contiguous())
    assert torch.equal(one["global"], parts["global"].view(5, 3, 2, hv)[:, :, 1])
    assert torch.equal(one["text"], parts["text"].view(3, 4, 2, ht)[:, :, 1])


def test_single_part_packing_is_a_copy():
    p = ActivationPacker((PackedPart("text", 4, 1, 8),), width=8)
    x = torch.randn(4, 2, 8)
    packed = p.pack({"text": x})
    assert packed._base is None and packed.data_ptr() != x.data_ptr() and torch.equal(packed, x)


def test_packing_rejects_wrong_shapes_and_dtypes():
    p = ActivationPacker((PackedPart("global", 4, 1, 8), PackedPart("text", 2, 1, 8)), width=8)
    with pytest.raises(ValueError, match="expected global"):
        p.pack({"global": torch.randn(3, 1, 8), "text": torch.randn(2, 1, 8)})
    with pytest.raises(ValueError, match="pipeline dtype"):
        p.pack({"global": torch.randn(4, 1, 8), "text": torch.randn(2, 1, 8).double()})
    with pytest.raises(ValueError, match="expected parts"):
        p.pack({"global": torch.randn(4, 1, 8)})
    with pytest.raises(ValueError, match="received pipeline tensor"):
        p.unpack(torch.randn(7, 1, 8))


_GUARD = """
import torch
import tulip_mega.parallel.cpu_compat as cc
import megatron.core.pipeline_parallel.schedules as sched
cc.needed = lambda: False          # pretend CUDA is there
assert cc.apply() is False
assert sched.torch is torch, "GPU path must keep megatron untouched"
cc.needed = lambda: True
assert cc.apply() is True
assert sched.torch is not torch
t = sched.torch.zeros([], dtype=torch.int, device="cuda")   # what the 1F1B schedule does
assert t.device.type == "cpu"
assert sched.torch.cuda.current_device() == "cpu"
print("ok")
"""


def test_cpu_compat_only_applies_without_cuda():
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _GUARD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("te", [False, True])
def test_fp8_needs_transformer_engine_at_launch(monkeypatch, te):
    import tulip_mega.models.specs as specs
    from tulip_mega.config import ConfigError, load_config

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: te)
    cfg = load_config(None, ["precision.fp8=e4m3"])
    if te:
        specs.check_layer_support(cfg.model, cfg.precision)
    else:
        with pytest.raises(ConfigError, match=r"precision.fp8='e4m3' needs Transformer Engine"):
            specs.check_layer_support(cfg.model, cfg.precision)


def test_transformer_impl_te_without_te_names_the_key(monkeypatch):
    import tulip_mega.models.specs as specs
    from tulip_mega.config import ConfigError, load_config

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: False)
    cfg = load_config(None, ["model.transformer_impl=te"])
    with pytest.raises(ConfigError, match=r"model.transformer_impl=te needs Transformer Engine"):
        specs.check_layer_support(cfg.model, cfg.precision)
    assert specs.use_transformer_engine("auto") is False
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    assert specs.use_transformer_engine("local") is False and specs.use_transformer_engine("auto") is True


def test_eval_progress_logs_samples_and_rate(caplog, monkeypatch):
    """A long embedding pass says how far it is (tulip_mega/eval/embed.py); a silent rank or a
    short pass says nothing."""
    import logging

    from tulip_mega.eval.embed import _Progress

    caplog.set_level(logging.INFO, logger="tulip_mega")
    monkeypatch.setattr(logging.getLogger("tulip_mega"), "propagate", True)
    p = _Progress("zero-shot images", speaks=True, every=0.0)
    p.update(32)
    p.update(16)
    p.done()
    lines = [r.getMessage() for r in caplog.records if r.name == "tulip_mega"]
    assert lines[0].startswith("zero-shot images: 32 samples embedded") and "/s)" in lines[0]
    assert lines[1].startswith("zero-shot images: 48 samples embedded")
    assert lines[2].startswith("zero-shot images: done, 48 samples")
    caplog.clear()
    quiet = _Progress("x", speaks=False, every=0.0)
    quiet.update(5)
    quiet.done()
    short = _Progress("y", speaks=True, every=3600.0)
    short.update(5)
    short.done()
    assert not [r for r in caplog.records if r.name == "tulip_mega"]
