"""benchmarks/loader.py refuses windows too short to time and picks defaults that are not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")
ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("loader_bench", ROOT / "benchmarks" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,message", [
    (["--samples", "351"], "loader.py: --samples 351 is too few: at least 352 (each loader runs 3 warm-up batches "
                           "(--threads 2 + 1) and --batches 8 timed ones of --batch-size 32 within one epoch)"),
    (["--host-only", "--samples", "512"],
     "loader.py: --samples 512 is too few: at least 40960 (with --workers 0,1,2 each worker's first message of up "
     "to 1024 samples (READ_CHUNK, or --samples-per-shard if smaller) is prepared before the timing starts and "
     "must be at most 5% of the window)"),
    (["--host-only", "--samples", "5000", "--samples-per-shard", "128"], "at least 5120 (with --workers 0,1,2"),
])
def test_too_few_samples_are_refused_with_the_minimum(argv, message):
    """Refused before any dataset is written: `main` exits with the message, no StopIteration."""
    with pytest.raises(SystemExit) as err:
        _bench().main(argv)
    assert message in str(err.value)


def test_defaults_meet_the_minimum():
    bench = _bench()
    host = bench.resolve_args(_parse(bench, ["--host-only"]))
    assert (host.samples, host.samples_per_shard, host.image_size) == (40960, 1024, 32)
    # 2 workers' first messages are 5% of the window: 2 x 1024 / 40960.
    assert 2 * min(bench.READ_CHUNK, host.samples_per_shard) / host.samples == pytest.approx(0.05)
    one = bench.resolve_args(_parse(bench, ["--host-only", "--workers", "0,1"]))
    assert one.samples == 20480
    e2e = bench.resolve_args(_parse(bench, []))
    assert (e2e.samples, e2e.samples_per_shard, e2e.image_size) == (512, 128, 224)
    big = bench.resolve_args(_parse(bench, ["--batches", "20"]))
    assert big.samples == (20 + 3) * 32  # the default grows to what the timing needs


def _parse(bench, argv):
    return bench.build_parser().parse_args(argv)
