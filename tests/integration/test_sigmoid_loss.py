"""Tests for tulip_mega.losses.sigmoid: dense SigLIP loss and its data-parallel versions.

The dense loss is checked against a direct formula written here independently (explicit loops
over pairs with log(sigmoid(.))); the distributed impls are checked against the dense loss on
the concatenated global batch, per the DP contract in DistributedSigmoidLoss's docstring.
Multi-process checks are grouped so that each world size spawns its processes only once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tulip_mega.losses import DistributedSigmoidLoss, sigmoid_loss
from tulip_mega.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[2]
F64_TOL = 1e-10
F32_TOL = 1e-5


# --------------------------------------------------------------------------------------------
# Helpers (module level: the spawned ranks import them)
# --------------------------------------------------------------------------------------------


def _embeddings(rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    y = F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    # Scale/bias drawn too, so that no test depends on one lucky value.
    scale = float(torch.empty(()).uniform_(3.0, 12.0, generator=g))
    bias = float(torch.empty(()).uniform_(-8.0, -1.0, generator=g))
    return x, y, scale, bias


def _leaves(x, y, scale, bias, dtype):
    return (
        x.detach().clone().requires_grad_(),
        y.detach().clone().requires_grad_(),
        torch.tensor(scale, dtype=dtype, requires_grad=True),
        torch.tensor(bias, dtype=dtype, requires_grad=True),
    )


def _direct_loss(x, y, scale, bias, labels):
    """-(1/B) sum over non-ignored pairs of log(sigmoid(z * (s * <x_i, y_j> + b))), by loops."""
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            z = int(labels[i][j])
            if z == 0:
                continue
            logit = scale * torch.dot(x[i], y[j]) + bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / x.shape[0]


def _diag_labels(n):
    return [[1 if i == j else -1 for j in range(n)] for i in range(n)]


def _dense_reference(xg, yg, scale, bias, dtype):
    """Value and gradients of the dense loss on the global batch."""
    x, y, s, b = _leaves(xg, yg, scale, bias, dtype)
    loss = sigmoid_loss(x, y, s, b)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad, b.grad


def _group_seed(ranks) -> int:
    return 1000 + sum((r + 1) * 10**i for i, r in enumerate(ranks))


def _run_case(group, ranks, impl, dtype_name, batch, dim, freeze_text):
    """One DP check on this rank: local loss and gradients as numpy (tensors can't cross the queue)."""
    dtype = getattr(torch, dtype_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    assert world == len(ranks) and dist.get_rank() == ranks[rank]
    xg, yg, scale, bias = _embeddings(world * batch, dim, _group_seed(ranks), dtype)
    rows = slice(rank * batch, (rank + 1) * batch)  # group-rank order = concatenation order
    x, y, s, b = _leaves(xg[rows], yg[rows], scale, bias, dtype)
    if freeze_text:
        y.requires_grad_(False)
    loss = DistributedSigmoidLoss(group=group, impl=impl)(x, y, s, b)
    loss.backward()
    grads = [x.grad, None if freeze_text else y.grad, s.grad, b.grad]
    return [loss.detach().numpy()] + [None if g is None else g.numpy() for g in grads]


def _dp_worker(subgroups, cases):
    """Create every subgroup (same order on all ranks, as new_group requires), run the cases.

    cases: (ranks or None for the world, impl, dtype name, batch, dim, freeze_text).
    Returns {case: result} for the cases this rank is a member of.
    """
    groups = {tuple(r): dist.new_group(list(r)) for r in subgroups}
    world_ranks = tuple(range(dist.get_world_size()))
    out = {}
    for case in cases:
        ranks, impl, dtype_name, batch, dim, freeze_text = case
        group = None if ranks is None else groups[tuple(ranks)]
        members = world_ranks if ranks is None else tuple(ranks)
        if dist.get_rank() in members:
            out[case] = _run_case(group, members, impl, dtype_name, batch, dim, freeze_text)
    return out


def _check_cases(results_by_rank, world, cases):
    """Mean of the rank losses and every gradient (/DP, averaged for scalars) vs the dense loss."""
    for case in cases:
        ranks, impl, dtype_name, batch, dim, freeze_text = case
        members = tuple(range(world)) if ranks is None else tuple(ranks)
        dp = len(members)
        dtype = getattr(torch, dtype_name)
        tol = F64_TOL if dtype == torch.float64 else F32_TOL
        per_rank = [
            [None if a is None else torch.from_numpy(a) for a in results_by_rank[r][case]] for r in members
        ]
        xg, yg, scale, bias = _embeddings(dp * batch, dim, _group_seed(members), dtype)
        # Reference in float64 on the same (possibly float32-rounded) inputs.
        ref_loss, ref_gx, ref_gy, ref_gs, ref_gb = _dense_reference(
            xg.double(), yg.double(), scale, bias, torch.float64
        )
        msg = f"case {case}"
        loss = torch.stack([r[0] for r in per_rank]).double().mean()
        torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol, msg=msg)
        gx = torch.cat([r[1] for r in per_rank]).double() / dp
        torch.testing.assert_close(gx, ref_gx, atol=tol, rtol=tol, msg=msg)
        if freeze_text:
            assert all(r[2] is None for r in per_rank), msg
        else:
            gy = torch.cat([r[2] for r in per_rank]).double() / dp
            torch.testing.assert_close(gy, ref_gy, atol=tol, rtol=tol, msg=msg)
        gs = torch.stack([r[3] for r in per_rank]).double().mean()
        gb = torch.stack([r[4] for r in per_rank]).double().mean()
        torch.testing.assert_close(gs, ref_gs, atol=tol, rtol=tol, msg=msg)
        torch.testing.assert_close(gb, ref_gb, atol=tol, rtol=tol, msg=msg)


# --------------------------------------------------------------------------------------------
# Dense loss
# --------------------------------------------------------------------------------------------


def test_dense_matches_direct_formula_value_and_grads():
    x0, y0, scale, bias = _embeddings(5, 7, seed=0)
    x, y, s, b = _leaves(x0, y0, scale, bias, torch.float64)
    loss = sigmoid_loss(x, y, s, b)
    loss.backward()

    xr, yr, sr, br = _leaves(x0, y0, scale, bias, torch.float64)
    ref = _direct_loss(xr, yr, sr, br, _diag_labels(5))
    ref.backward()

    assert loss.shape == ()
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for got, want in [(x.grad, xr.grad), (y.grad, yr.grad), (s.grad, sr.grad), (b.grad, br.grad)]:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # Same value with float scale/bias and with the equivalent explicit pair weights.
    torch.testing.assert_close(sigmoid_loss(x0, y0, scale, bias), ref.detach(), atol=1e-12, rtol=1e-12)
    weights = 2.0 * torch.eye(5, dtype=torch.float64) - 1.0
    got = sigmoid_loss(x0, y0, scale, bias, weights)
    torch.testing.assert_close(got, ref.detach(), atol=1e-12, rtol=1e-12)


def test_dense_gradcheck_float64():
    x0, y0, scale, bias = _embeddings(4, 3, seed=1)
    inputs = _leaves(x0, y0, scale, bias, torch.float64)
    assert torch.autograd.gradcheck(sigmoid_loss, inputs, eps=1e-6, atol=1e-8)
    weights = torch.tensor(
        [[1, -1, 0, -1], [-1, 1, -1, 1], [0, 0, 1, -1], [-1, -1, -1, 1]], dtype=torch.float64
    )
    weighted = lambda *a: sigmoid_loss(*a, pair_weights=weights)  # noqa: E731
    assert torch.autograd.gradcheck(weighted, inputs, eps=1e-6, atol=1e-8)


def test_dense_stable_for_large_logits():
    # log(sigmoid(-1000)) underflows to -inf; the softplus form must not.
    x = torch.eye(3, dtype=torch.float64)
    y = torch.eye(3, dtype=torch.float64)
    loss = sigmoid_loss(x, y, 1000.0, 0.0)  # positives at +1000, negatives at 0
    log2 = 0.6931471805599453
    torch.testing.assert_close(loss, torch.tensor(2.0 * log2, dtype=torch.float64))
    loss = sigmoid_loss(x, -y, 1000.0, 0.0)  # positives at -1000: cost ~1000 each
    torch.testing.assert_close(loss, torch.tensor(1000.0 + 2.0 * log2, dtype=torch.float64))


def test_dense_half_precision_returns_float32():
    x0, y0, scale, bias = _embeddings(6, 8, seed=2)
    loss = sigmoid_loss(x0.bfloat16(), y0.bfloat16(), scale, bias)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), sigmoid_loss(x0, y0, scale, bias), atol=0.05, rtol=0.02)


# --------------------------------------------------------------------------------------------
# Pair weights
# --------------------------------------------------------------------------------------------


def _random_labels(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.where(torch.rand(rows, cols, generator=g) < 0.3, 1.0, -1.0).double()
    return labels


def test_pair_weights_rectangular_match_direct_formula():
    x0, _, scale, bias = _embeddings(4, 6, seed=3)
    _, y0, _, _ = _embeddings(7, 6, seed=4)
    labels = _random_labels(4, 7, seed=5)
    labels[1, 2] = 0.0
    labels[3, 6] = 0.0
    got = sigmoid_loss(x0, y0, scale, bias, labels)
    want = _direct_loss(x0, y0, scale, bias, labels.tolist())
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_ignored_pair_equals_removing_it_from_the_sum():
    x0, y0, scale, bias = _embeddings(5, 6, seed=6)
    labels = _random_labels(5, 5, seed=7)
    i, j = 2, 4
    full = sigmoid_loss(x0, y0, scale, bias, labels)
    logit = scale * torch.dot(x0[i], y0[j]) + bias
    term = -torch.log(torch.sigmoid(labels[i, j] * logit))  # that pair's share of the sum
    ignored = labels.clone()
    ignored[i, j] = 0.0
    # Normalisation stays 1/B (rows), so removing the term is a plain subtraction.
    got = sigmoid_loss(x0, y0, scale, bias, ignored)
    torch.testing.assert_close(got, full - term / 5, atol=1e-12, rtol=1e-12)

    # An all-ignored row gets no gradient at all; the others are untouched by it.
    ignored_row = labels.clone()
    ignored_row[i] = 0.0
    x, y, s, b = _leaves(x0, y0, scale, bias, torch.float64)
    sigmoid_loss(x, y, s, b, ignored_row).backward()
    assert torch.count_nonzero(x.grad[i]) == 0
    assert torch.count_nonzero(x.grad[(i + 1) % 5]) > 0


def test_flipping_a_label_changes_loss_by_exact_amount():
    x0, y0, scale, bias = _embeddings(6, 5, seed=8)
    labels = -torch.ones(6, 6, dtype=torch.float64)
    labels.fill_diagonal_(1.0)
    i, j = 1, 3
    assert labels[i, j] == -1
    flipped = labels.clone()
    flipped[i, j] = 1.0
    logit = scale * torch.dot(x0[i], y0[j]) + bias
    delta = sigmoid_loss(x0, y0, scale, bias, flipped) - sigmoid_loss(x0, y0, scale, bias, labels)
    # Term goes from -log sigmoid(-l) = softplus(l) to -log sigmoid(l) = softplus(-l), over B rows,
    # and softplus(-l) - softplus(l) = -l exactly.
    expected = (F.softplus(-logit) - F.softplus(logit)) / 6
    torch.testing.assert_close(delta, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(delta, -logit / 6, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bad", [0.5, 2.0, -2.0, float("nan")])
def test_pair_weights_bad_values_raise(bad):
    x0, y0, scale, bias = _embeddings(3, 4, seed=9)
    weights = 2.0 * torch.eye(3, dtype=torch.float64) - 1.0
    weights[0, 1] = bad
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        sigmoid_loss(x0, y0, scale, bias, weights)


def test_shape_and_type_errors_name_the_shapes():
    x0, y0, scale, bias = _embeddings(3, 4, seed=10)
    with pytest.raises(ValueError, match="bool"):
        sigmoid_loss(x0, y0, scale, bias, torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 2\)"):
        sigmoid_loss(x0, y0, scale, bias, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2, 4\)"):
        sigmoid_loss(x0, y0[:2], scale, bias)  # rectangular needs pair_weights
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 3\)"):
        sigmoid_loss(x0, y0[:, :3], scale, bias)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        sigmoid_loss(x0[0], y0, scale, bias)
    with pytest.raises(ValueError, match="logit_scale"):
        sigmoid_loss(x0, y0, torch.ones(2), bias)


# --------------------------------------------------------------------------------------------
# DistributedSigmoidLoss
# --------------------------------------------------------------------------------------------


def test_invalid_impl_name():
    with pytest.raises(ValueError, match="impl"):
        DistributedSigmoidLoss(impl="allgather")


@pytest.mark.parametrize("impl", ["ring", "gather"])
def test_distributed_without_process_group_is_dense(impl):
    assert not dist.is_initialized()
    x0, y0, scale, bias = _embeddings(4, 5, seed=11)
    torch.testing.assert_close(
        DistributedSigmoidLoss(impl=impl)(x0, y0, scale, bias), sigmoid_loss(x0, y0, scale, bias)
    )
    with pytest.raises(ValueError, match="same pairs"):
        DistributedSigmoidLoss(impl=impl)(x0, y0[:3], scale, bias)


DP2_CASES = [
    (None, impl, dtype, batch, dim, False)
    for impl in ("ring", "gather")
    for dtype, batch, dim in (("float64", 3, 5), ("float32", 16, 8))
] + [(None, "ring", "float64", 3, 5, True), (None, "gather", "float64", 3, 5, True)]


def test_dp2_matches_dense_on_global_batch():
    results = run_distributed(_dp_worker, 2, [], DP2_CASES, timeout=120)
    _check_cases(results, 2, DP2_CASES)


# World 4: the whole world as DP=4; the TP/PP-like situation where DP is a strict subgroup
# ({0,2} and {1,3}, each with its own data); and a 3-rank subgroup for an odd ring (two
# neighbours per step, no single-direction remainder step).
DP4_SUBGROUPS = [(0, 2), (1, 3), (0, 1, 2)]
DP4_CASES = [
    (ranks, impl, "float64", 4, 6, False)
    for ranks in (None, (0, 2), (1, 3), (0, 1, 2))
    for impl in ("ring", "gather")
] + [(None, "ring", "float32", 8, 16, False)]


def test_dp4_and_dp_subgroups_match_dense():
    results = run_distributed(_dp_worker, 4, DP4_SUBGROUPS, DP4_CASES, timeout=180)
    _check_cases(results, 4, DP4_CASES)
    # Sanity: the two DP groups really ran on different data.
    a = results[0][((0, 2), "ring", "float64", 4, 6, False)]
    b = results[1][((1, 3), "ring", "float64", 4, 6, False)]
    assert float(abs(a[0] - b[0])) > 1e-6


# World 5: two bidirectional ring steps, so received blocks and their gradient accumulators
# are forwarded in both directions before the final hop home (W <= 4 never forwards leftwards).
DP5_CASES = [(None, "ring", "float64", 2, 4, False), (None, "ring", "float64", 2, 4, True)]


def test_dp5_ring_multi_step_matches_dense():
    results = run_distributed(_dp_worker, 5, [], DP5_CASES, timeout=180)
    _check_cases(results, 5, DP5_CASES)


# --------------------------------------------------------------------------------------------
# Benchmark smoke test
# --------------------------------------------------------------------------------------------


def test_benchmark_quick_runs():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loss_memory.py"), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== ratios vs DP=1 (same impl) ==" in proc.stdout
    for impl in ("ring", "gather", "dense"):
        assert any(line.split()[:2] == [impl, "4"] for line in proc.stdout.splitlines()), proc.stdout
