"""scripts/gpu_acceptance.sh on a machine without a GPU: it runs end to end, reports every GPU
check as skipped with the reason, and its comparison machinery (the same functions the GPU
checks call) passes an equal layout and fails a perturbed one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_acceptance as acc  # noqa: E402


def test_script_runs_on_cpu_and_says_why_each_gpu_check_is_skipped(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_acceptance.sh"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    for name in acc.CHECKS:
        assert f"| {name} |" in report, name
    rows = {ln.split("|")[1].strip(): ln for ln in report.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert "| pass |" in rows["environment"] and "megatron-core 0.16.1" in rows["environment"]
    gpu_checks = [n for n in acc.CHECKS if n != "environment"]
    for name in gpu_checks:
        assert "| skip |" in rows[name] and "no CUDA device" in rows[name], rows[name]
    assert f"1 passed, 0 failed, {len(gpu_checks)} skipped" in report


def test_unknown_check_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--only", "nccl,mfu",
                           "--out", str(tmp_path / "r.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown check(s) ['nccl']" in proc.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_layout_comparison_passes_tp2_and_catches_a_wrong_gradient():
    """What nccl_layouts does on GPUs, on gloo: TP2 of the full TULIP stack (padded captions,
    4 micro-batches) against the single-process reference; then one gradient perturbed."""
    base = acc.TULIP + acc.FP32
    ref = acc.run_ranks(1, "gloo", base)
    out = acc.run_ranks(2, "gloo", base + ["parallel.tensor_parallel=2"])
    summary = acc.compare_steps(out, ref)
    assert "loss terms" in summary and "gradients" in summary
    target = next(e[0] for e in out[0]["entries"] if e[4].abs().max() > 0)
    for r in out:  # replicated parameters are reported by both TP ranks
        r["entries"] = [(k, *rest[:3], rest[3] * 1.01 if k == target else rest[3]) for k, *rest in r["entries"]]
    with pytest.raises(AssertionError, match="over tolerance"):
        acc.compare_steps(out, ref)
