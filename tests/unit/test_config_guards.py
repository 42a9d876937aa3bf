"""Recipe values that megatron-core (or a step) would reject with a bare assertion are refused
at load time with a message naming the key.

Each case shows both halves: the library call the trainer would make with that value fails
without naming any recipe key (megatron's `OptimizerParamScheduler` asserts with no message),
and `load_config` refuses the recipe first, naming the key(s).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tulip_mega.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def _megatron_scheduler(cfg) -> None:
    """The trainer's LR/WD schedule (training/optimizer.make_scheduler) over a stand-in optimizer."""
    from tulip_mega.training.optimizer import make_scheduler

    make_scheduler(cfg, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


# (overrides, fragment of our message). Every override set reaches a bare `assert` in
# megatron/core/optimizer_param_scheduler.py (0.16.1) when it gets past the config.
SCHEDULER_CASES = [
    (["train.steps=1", "optim.warmup_steps=1"],  # assert self.lr_warmup_steps < self.lr_decay_steps
     "optim.warmup_steps=1 must be < train.steps=1"),
    (["train.steps=50", "optim.warmup_steps=60"], "optim.warmup_steps=60 must be < train.steps=50"),
    (["optim.lr=0.001", "optim.min_lr=0.01"],  # assert self.max_lr >= self.min_lr
     "optim.min_lr=0.01 must be in [0, optim.lr=0.001]"),
    (["optim.min_lr=-0.1"], "optim.min_lr=-0.1 must be in [0, optim.lr="),  # assert self.min_lr >= 0.0
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),  # assert self.start_wd >= 0.0
]


@pytest.mark.parametrize("overrides,fragment", SCHEDULER_CASES)
def test_scheduler_values_megatron_asserts_on_are_refused_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, overrides)
    # What the recipe would have met without the check: megatron's assertion, no key named.
    cfg = load_config(None)
    for override in overrides:
        section, key = override.split("=")[0].split(".")
        value = type(getattr(getattr(cfg, section), key))(override.split("=")[1])
        setattr(getattr(cfg, section), key, value)
    with pytest.raises(AssertionError) as err:
        _megatron_scheduler(cfg)
    assert str(err.value) == "", "megatron now names the problem; the check may be redundant"


def test_warmup_one_step_shorter_than_the_run_is_accepted():
    cfg = load_config(None, ["train.steps=2", "optim.warmup_steps=1"])
    _megatron_scheduler(cfg)


def test_mae_needs_two_patches():
    """One patch per image would leave MAE nothing to mask: refused at load, where the step
    would otherwise stop inside the mask draw (losses/reconstruction.mae_mask)."""
    from tulip_mega.losses.reconstruction import mae_mask

    bad = ["loss.weights.mae=1", "model.vision.image_size=8", "model.vision.patch_size=8"]
    with pytest.raises(ConfigError, match=re.escape("loss.weights.mae=1.0 masks patches of view 0, but "
                                                    "model.vision.image_size=8 / model.vision.patch_size=8 gives 1 "
                                                    "patch")):
        load_config(None, bad)
    with pytest.raises(ValueError, match="num_visible"):
        mae_mask(["k"], 0, 0, 1, 1)
    load_config(None, bad[:2] + ["model.vision.patch_size=4"])  # 4 patches: fine


def test_trainer_exits_2_naming_both_keys(capsys):
    """`tulip_mega.train` with a warm-up as long as the run: exit code 2 before any process group."""
    from tulip_mega.train import EXIT_CONFIG_ERROR, main

    code = main([str(REPO / "recipes" / "tiny_cpu.yaml"), "train.steps=1", "optim.warmup_steps=1"])
    assert code == EXIT_CONFIG_ERROR == 2
    err = capsys.readouterr().err
    assert "tulip-mega: config error: optim.warmup_steps=1 must be < train.steps=1" in err
