"""The run's layout is resolved once per process: `validate_split` (with the balanced split's
search) and `input_streams` run exactly once from the loaded recipe to the first trained step,
and once per `plan`. Loading the recipe validates it on its own, before any layout exists: that
derives the streams once more (for its sequence-parallel and FP8 shape checks) and runs no split."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from tulip_mega.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
COUNTED = {"validate_split": "tulip_mega.models.pipeline_split", "input_streams": "tulip_mega.config.streams"}


def count_calls(counts: Counter, set_attr=setattr) -> None:
    """Wrap the counted functions in their module and in every tulip_mega module that bound
    them by name (`from ... import input_streams`), with `set_attr` (monkeypatch's undoes it)."""
    import importlib

    for name, home in COUNTED.items():
        real = getattr(importlib.import_module(home), name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("tulip_mega") and getattr(module, name, None) is real:
                set_attr(module, name, counted)


def train_worker(argv: list[str]) -> dict:
    """`tulip_mega.train.main(argv)` with the counters reset once the recipe has loaded."""
    import warnings

    warnings.filterwarnings("ignore")
    import tulip_mega.config
    import tulip_mega.launch  # noqa: F401 - bind the counted names before wrapping them
    import tulip_mega.train
    import tulip_mega.training.loop  # noqa: F401

    counts: Counter = Counter()
    count_calls(counts)
    load = tulip_mega.config.load_config
    at_load: dict = {}

    def load_then_count(*args, **kwargs):
        cfg = load(*args, **kwargs)
        at_load.update(counts)
        counts.clear()
        return cfg

    tulip_mega.config.load_config = load_then_count
    code = tulip_mega.train.main(argv)
    return {"code": code, "counts": dict(counts), "at_load": at_load}


@pytest.mark.multiprocess
def test_train_start_up_resolves_the_layout_once(shapes_data, tmp_path):
    argv = [RECIPE, f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
            f"run.output_dir={tmp_path}", "run.name=once", "parallel.tensor_parallel=1",
            "parallel.pipeline_parallel=1", "train.global_batch_size=16", "train.micro_batch_size=8",
            "train.steps=2", "optim.warmup_steps=1", "logging.tensorboard=false", "eval.interval=0",
            "checkpoint.interval=0"]
    result = run_distributed(train_worker, 1, argv)[0]
    assert result["code"] == 0
    assert result["at_load"] == {"input_streams": 1}
    assert result["counts"] == {"validate_split": 1, "input_streams": 1}


def test_plan_resolves_the_layout_once(monkeypatch):
    from tulip_mega.config import load_config
    from tulip_mega.data_rate import data_rate
    from tulip_mega.plan import format_plan, make_plan

    cfg = load_config(str(REPO / "recipes" / "tulip_1b.yaml"), ["parallel.pipeline_parallel=4"])
    counts: Counter = Counter()
    with monkeypatch.context() as patch:
        count_calls(counts, patch.setattr)
        plan = make_plan(cfg, nodes=8)
        format_plan(cfg, plan), data_rate(cfg, plan)
    assert counts == {"validate_split": 1, "input_streams": 1}
    assert plan.layout.split == plan.pipeline.split
