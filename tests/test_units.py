"""Fast unit tests: launcher environment, pipeline activation packing, CPU compatibility guard."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tulip_mega.models.packing import TowerActivationPacker
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


@pytest.mark.parametrize("hv,ht", [(64, 64), (64, 48), (96, 64)])
def test_packing_round_trip(hv, ht):
    p = TowerActivationPacker(vision_seq=5, vision_hidden=hv, text_seq=3, text_hidden=ht)
    v, t = torch.randn(5, 2, hv), torch.randn(3, 2, ht)
    packed = p.pack(v, t)
    assert packed.shape == p.shape(2)
    assert packed._base is None, "megatron deallocates pipeline outputs: the packed tensor must not be a view"
    v2, t2 = p.unpack(packed)
    assert torch.equal(v2, v) and torch.equal(t2, t)


def test_packing_rejects_wrong_shapes_and_dtypes():
    p = TowerActivationPacker(vision_seq=4, vision_hidden=8, text_seq=2, text_hidden=8)
    with pytest.raises(ValueError, match="expected vision"):
        p.pack(torch.randn(3, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="pipeline dtype"):
        p.pack(torch.randn(4, 1, 8), torch.randn(2, 1, 8).double())
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
    from tulip_mega.parallel.init import check_runtime_support

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: te)
    cfg = load_config(None, ["precision.fp8=e4m3"])
    if te:
        check_runtime_support(cfg)
    else:
        with pytest.raises(ConfigError, match=r"precision.fp8='e4m3' needs Transformer Engine"):
            check_runtime_support(cfg)
