"""The loss of a model that has learned nothing (losses/chance.py) and the plateau warning
(training/plateau.py): the closed forms against a brute-force minimum over a shared logit of
the real loss functions, and the warning on a constant-embedding model vs a learning one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tulip_mega.losses.chance import (infonce_chance_loss, sigmoid_chance_loss,
                                      weighted_pairs_chance_loss)
from tulip_mega.losses.infonce import DistributedInfoNCELoss
from tulip_mega.losses.pairwise import pair_sigmoid_loss
from tulip_mega.losses.sigmoid import DistributedSigmoidLoss
from tulip_mega.losses.stack import pair_weights
from tulip_mega.training.plateau import PlateauWatch


def _constant_embeddings(rows: int, cols: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row and column the same unit vector: every logit is scale + bias."""
    e = F.normalize(torch.ones(dim, dtype=torch.float64), dim=0)
    return e.expand(rows, dim).clone(), e.expand(cols, dim).clone()


def _brute_force_min(loss_at_bias) -> float:
    """min over the shared logit (scale 1, bias on a grid, refined twice around the best)."""
    lo, hi, best = -15.0, 5.0, None
    for _ in range(6):
        grid = torch.linspace(lo, hi, 201, dtype=torch.float64)
        values = torch.tensor([loss_at_bias(float(b)) for b in grid])
        i = int(values.argmin())
        best = float(values[i])
        step = float(grid[1] - grid[0])
        lo, hi = float(grid[i]) - 2 * step, float(grid[i]) + 2 * step
    return best


@pytest.mark.parametrize("batch", [2, 8, 32, 128])
def test_sigmoid_chance_is_the_brute_force_minimum_of_the_real_loss(batch):
    image, text = _constant_embeddings(batch, batch)
    loss = DistributedSigmoidLoss(group=None)
    scale = torch.tensor(1.0, dtype=torch.float64)

    def at(bias: float) -> float:
        return float(loss(image, text, scale, torch.tensor(bias - 1.0, dtype=torch.float64)))  # logit = bias

    expected = sigmoid_chance_loss(1.0, batch - 1.0)
    assert _brute_force_min(at) == pytest.approx(expected, rel=1e-7)
    if batch == 32:
        assert expected == pytest.approx(4.4499, abs=1e-4)  # the number the issue quotes
    if batch == 128:
        assert expected == pytest.approx(5.85, abs=0.01)


@pytest.mark.parametrize("batch", [2, 8, 32, 128])
def test_infonce_chance_is_log_batch_for_any_shared_logit(batch):
    image, text = _constant_embeddings(batch, batch)
    for smoothing in (0.0, 0.1):
        loss = DistributedInfoNCELoss(group=None, label_smoothing=smoothing)
        for scale in (0.5, 10.0, 100.0):
            value = float(loss(image, text, torch.tensor(scale, dtype=torch.float64)))
            assert value == pytest.approx(infonce_chance_loss(batch), rel=1e-9)
    assert infonce_chance_loss(32) == pytest.approx(math.log(32))


def test_weighted_pairs_chance_is_the_brute_force_minimum():
    """A TULIP-like image-image weight matrix (2 anchors, a crop, a GeCo +1/-1 edit with one
    missing) and a text-text one: the closed form from the weights equals the brute force."""
    b = 6
    same = torch.ones(4, b)
    valid = torch.ones(4, b, dtype=torch.bool)
    valid[3, 2] = False
    same[3] = -valid[3].float()  # the negative edit: -1 where present
    for same_, valid_, self_view in ((same, valid, [0, 1]),
                                     (torch.tensor([[0.0] * b, [1.0] * b, [-1.0] * b]),
                                      torch.ones(3, b, dtype=torch.bool), [0])):
        local, remote = pair_weights(same_, valid_, self_view)
        rows, cols = _constant_embeddings(local.shape[0], local.shape[1])

        def at(bias: float) -> float:
            return float(pair_sigmoid_loss(rows, cols, local.double(), torch.tensor(1.0, dtype=torch.float64),
                                           torch.tensor(bias - 1.0, dtype=torch.float64)))  # logit = bias

        expected = float(weighted_pairs_chance_loss(local, remote, dp_size=1))
        assert _brute_force_min(at) == pytest.approx(expected, rel=1e-7)


def _train(learnable_embeddings: bool, steps: int = 300, batch: int = 16, seed: int = 0) -> list[float]:
    """Adam on the real sigmoid loss with SigLIP's initialisation (t = 10, b = -10). The
    constant model's image and text embeddings are one shared vector (only t and b learn);
    the learning one has a free embedding per sample."""
    g = torch.Generator().manual_seed(seed)
    dim = 16
    if learnable_embeddings:
        img = torch.randn(batch, dim, generator=g).requires_grad_()
        txt = torch.randn(batch, dim, generator=g).requires_grad_()
    else:
        img = torch.randn(1, dim, generator=g).requires_grad_()
        txt = img
    t, b = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    params = [img, t, b] + ([txt] if learnable_embeddings else [])
    opt = torch.optim.Adam(params, lr=0.1)
    loss_fn = DistributedSigmoidLoss(group=None)
    losses = []
    for _ in range(steps):
        i, x = F.normalize(img, dim=-1).expand(batch, dim), F.normalize(txt, dim=-1).expand(batch, dim)
        loss = loss_fn(i, x, t.exp(), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("learning", [False, True])
def test_plateau_warning_fires_on_a_constant_model_only(learning):
    batch, warmup, patience = 16, 20, 50
    chance = sigmoid_chance_loss(1.0, batch - 1.0)
    watch = PlateauWatch(warmup_steps=warmup, patience=patience)
    warnings = []
    losses = _train(learning, batch=batch)
    for step, value in enumerate(losses, start=1):
        warnings += watch.update(step, {"loss/image_text": value, "chance/image_text": chance})
    if learning:
        assert losses[-1] < 0.5 * chance and warnings == []
    else:
        assert losses[-1] == pytest.approx(chance, rel=0.01)
        assert len(warnings) == 1 and "loss/image_text" in warnings[0] and f"{chance:.4f}" in warnings[0]


def test_plateau_watch_waits_for_warmup_and_patience_and_can_be_off():
    metrics = {"loss/image_text": 4.45, "chance/image_text": 4.4499}
    watch = PlateauWatch(warmup_steps=10, patience=5)
    fired = [s for s in range(1, 30) if watch.update(s, metrics)]
    assert fired == [15]  # steps 11..15 after warm-up; once per stay on the plateau
    assert watch.update(30, {**metrics, "loss/image_text": 3.0}) == []  # left it
    assert [s for s in range(31, 40) if watch.update(s, metrics)] == [35]  # back on it: warns again
    off = PlateauWatch(warmup_steps=0, patience=0)
    assert all(off.update(s, metrics) == [] for s in range(1, 100))
