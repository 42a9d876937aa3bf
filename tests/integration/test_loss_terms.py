"""Tests for the TULIP / CLIP loss terms: pairwise sigmoid, InfoNCE, MAE and causal text.

Every term is checked against a reference written here independently, in float64, with
explicit loops or formulas (log(sigmoid(.)) instead of softplus, a hand-written smoothed target
distribution instead of F.cross_entropy(label_smoothing=...), F.unfold / loops instead of
reshapes). The distributed terms are checked against the dense reference on the concatenated
global batch, per the DP contract: mean of the rank losses == dense loss, gradients / DP ==
dense gradients. All multi-process checks share ONE 2-rank spawn.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tulip_mega.losses import (
    DistributedInfoNCELoss,
    DistributedPairSigmoidLoss,
    causal_text_loss,
    infonce_loss,
    mae_loss,
    mae_mask,
    mae_targets,
    pair_sigmoid_loss,
    patchify,
    same_sample_weights,
)
from tulip_mega.data.tokenizer import PAD_ID
from tulip_mega.parallel.spawn import run_distributed

TOL = dict(atol=1e-10, rtol=1e-10)
WORLD = 2


# --------------------------------------------------------------------------------------------
# Independent references and data (module level: the spawned ranks import them)
# --------------------------------------------------------------------------------------------


def _unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def ref_pair_loss(rows, cols, weights, scale, bias):
    """-(1/R) sum over pairs with w != 0 of log(sigmoid(w * (s <x_r, y_c> + b))), by loops."""
    total = rows.new_zeros(())
    for r in range(rows.shape[0]):
        for c in range(cols.shape[0]):
            w = float(weights[r][c])
            if w != 0:
                total = total - torch.log(torch.sigmoid(w * (scale * torch.dot(rows[r], cols[c]) + bias)))
    return total / rows.shape[0]


def ref_infonce(x, y, scale, eps):
    """Symmetric InfoNCE with q = (1 - eps) onehot + eps / K written out, K = number of columns."""

    def one_direction(a, b):
        logits = scale * (a @ b.T)  # [N, N]
        n = logits.shape[0]
        total = a.new_zeros(())
        for i in range(n):
            log_p = logits[i] - torch.log(torch.exp(logits[i]).sum())
            q = torch.full((n,), eps / n, dtype=a.dtype)
            q[i] += 1.0 - eps
            total = total - (q * log_p).sum()
        return total / n

    return 0.5 * (one_direction(x, y) + one_direction(y, x))


def ref_text_loss(logits, targets, pad_id):
    """logits [L, B, V] full vocab, targets [B, L]: mean over non-pad of logsumexp - logit[target]."""
    total, count = logits.new_zeros(()), 0
    for t in range(logits.shape[0]):
        for b in range(logits.shape[1]):
            tok = int(targets[b, t])
            if tok == pad_id:
                continue
            total = total + torch.logsumexp(logits[t, b], dim=0) - logits[t, b, tok]
            count += 1
    return total / max(count, 1)


def pair_problem(seed: int, rows: int = 3, cols: int = 4, dim: int = 5):
    """Global rows/cols and per-rank weights for WORLD ranks, the same on every process."""
    g = torch.Generator().manual_seed(seed)
    x, y = _unit(WORLD * rows, dim, g), _unit(WORLD * cols, dim, g)
    local = torch.randint(-1, 2, (WORLD, rows, cols), generator=g).double()  # {-1, 0, 1}
    remote = -torch.randint(0, 2, (WORLD, cols), generator=g).double()  # {-1, 0}
    remote[0, 1] = 0.0  # at least one ignored remote column
    return x, y, local, remote, 7.5, -3.0


def views_problem(seed: int, samples: int = 2, views: int = 3, dim: int = 6):
    """Image-image: each rank has `samples` images x `views` views; rows and columns are the views."""
    g = torch.Generator().manual_seed(seed)
    v = _unit(WORLD * samples * views, dim, g)
    valid = torch.ones(WORLD, samples * views, dtype=torch.bool)
    valid[1, -1] = False  # a padding view slot on rank 1
    return v, valid, 9.0, -5.0


def pair_global_weights(local, remote):
    """The dense block matrix: rank q's rows vs rank p's columns -> local_q if p == q else remote_p."""
    world, rows, cols = local.shape
    out = torch.empty(world * rows, world * cols, dtype=torch.float64)
    for q in range(world):
        for p in range(world):
            block = local[q] if p == q else remote[p][None, :].expand(rows, cols)
            out[q * rows:(q + 1) * rows, p * cols:(p + 1) * cols] = block
    return out


def views_global_weights(valid, samples, views):
    """By loops, from GLOBAL labels: same image +1, self 0, other image -1, padding row/column 0."""
    flat_valid = valid.reshape(-1)
    n = flat_valid.numel()
    w = torch.zeros(n, n, dtype=torch.float64)
    for r in range(n):
        for c in range(n):
            if r == c or not flat_valid[c] or not flat_valid[r]:
                continue
            w[r, c] = 1.0 if r // views == c // views else -1.0
    return w


def views_local_weights(valid_rank, samples, views):
    sample = torch.arange(samples).repeat_interleave(views)
    obj = torch.arange(samples * views)
    return same_sample_weights(sample, sample, torch.ones(samples * views), col_valid=valid_rank,
                               same_object=(obj, obj))


def text_problem(seed: int, seq: int = 5, batch: int = 3, vocab: int = 8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(seq, batch, vocab, generator=g, dtype=torch.float64) * 2.0
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[0, 3:] = 0  # padding tail (pad id 0)
    targets[2, 4] = 0
    return logits, targets


# --------------------------------------------------------------------------------------------
# Pairwise sigmoid loss
# --------------------------------------------------------------------------------------------


def test_pair_loss_dense_matches_loops_value_and_grads():
    x0, y0, local, _, scale, bias = pair_problem(seed=1, rows=4, cols=6)
    x0, y0, w = x0[:4], y0[:6], local[0]
    for loss_fn in (
        lambda *a: pair_sigmoid_loss(*a[:2], w, *a[2:]),
        lambda *a: DistributedPairSigmoidLoss()(*a[:2], w, torch.zeros(6), *a[2:]),  # no dist: dense
    ):
        x, y, s, b = _leaf(x0), _leaf(y0), _scalar(scale), _scalar(bias)
        loss = loss_fn(x, y, s, b)
        loss.backward()
        xr, yr, sr, br = _leaf(x0), _leaf(y0), _scalar(scale), _scalar(bias)
        ref = ref_pair_loss(xr, yr, w, sr, br)
        ref.backward()
        assert loss.shape == ()
        torch.testing.assert_close(loss, ref, **TOL)
        for got, want in ((x.grad, xr.grad), (y.grad, yr.grad), (s.grad, sr.grad), (b.grad, br.grad)):
            torch.testing.assert_close(got, want, **TOL)
    # Half-precision embeddings: float32 result, close to the float64 value.
    half = pair_sigmoid_loss(x0.bfloat16(), y0.bfloat16(), w, scale, bias)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), ref.detach(), atol=0.05, rtol=0.02)


def test_pair_loss_ignored_column_changes_nothing():
    x0, y0, local, _, scale, bias = pair_problem(seed=2)
    x0, y0, w = x0[:3], y0[:4], local[0]
    extra = F.normalize(torch.randn(1, 5, dtype=torch.float64), dim=-1)
    w_extra = torch.cat([w, torch.zeros(3, 1, dtype=torch.float64)], dim=1)

    x, y, s, b = _leaf(x0), _leaf(y0), _scalar(scale), _scalar(bias)
    base = pair_sigmoid_loss(x, y, w, s, b)
    base.backward()
    x2, y2, s2, b2 = _leaf(x0), _leaf(torch.cat([y0, extra])), _scalar(scale), _scalar(bias)
    more = pair_sigmoid_loss(x2, y2, w_extra, s2, b2)
    more.backward()
    torch.testing.assert_close(more, base, **TOL)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    torch.testing.assert_close(y2.grad[:4], y.grad, **TOL)
    assert torch.count_nonzero(y2.grad[4]) == 0  # exactly zero, not just small
    torch.testing.assert_close(s2.grad, s.grad, **TOL)
    torch.testing.assert_close(b2.grad, b.grad, **TOL)

    # row_valid=False ignores a whole row (normalisation stays 1/R): same as zeroing its weights.
    row_valid = torch.tensor([True, False, True])
    got = DistributedPairSigmoidLoss()(x0, y0, w, torch.zeros(4), scale, bias, row_valid=row_valid)
    w_row = w.clone()
    w_row[1] = 0.0
    torch.testing.assert_close(got, ref_pair_loss(x0, y0, w_row, scale, bias), **TOL)
    with pytest.raises(ValueError, match=r"row_valid must be a bool tensor of shape \(3,\)"):
        DistributedPairSigmoidLoss()(x0, y0, w, torch.zeros(4), scale, bias, row_valid=torch.ones(3))


def test_pair_loss_flipping_a_label_changes_loss_by_minus_logit_over_rows():
    x0, y0, _, _, scale, bias = pair_problem(seed=3)
    x0, y0 = x0[:3], y0[:4]
    w = -torch.ones(3, 4, dtype=torch.float64)
    r, c = 2, 1
    flipped = w.clone()
    flipped[r, c] = 1.0
    logit = scale * torch.dot(x0[r], y0[c]) + bias
    delta = pair_sigmoid_loss(x0, y0, flipped, scale, bias) - pair_sigmoid_loss(x0, y0, w, scale, bias)
    torch.testing.assert_close(delta, (F.softplus(-logit) - F.softplus(logit)) / 3, **TOL)
    torch.testing.assert_close(delta, -logit / 3, **TOL)


def test_pair_loss_validation_names_the_argument():
    x0, y0, local, remote, scale, bias = pair_problem(seed=4)
    x0, y0, w, rw = x0[:3], y0[:4], local[0], remote[0]
    loss = DistributedPairSigmoidLoss()
    with pytest.raises(ValueError, match=r"local_weights must have shape \(3, 4\), got \(3, 3\)"):
        loss(x0, y0, w[:, :3], rw, scale, bias)
    bad = w.clone()
    bad[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"local_weights entries .*0\.5"):
        loss(x0, y0, bad, rw, scale, bias)
    with pytest.raises(ValueError, match="local_weights .*bool"):
        loss(x0, y0, w.bool(), rw, scale, bias)
    plus = rw.clone()
    plus[0] = 1.0  # a foreign column can never be a positive
    with pytest.raises(ValueError, match=r"remote_col_weights entries must be in \(-1.0, 0.0\)"):
        loss(x0, y0, w, plus, scale, bias)
    with pytest.raises(ValueError, match=r"remote_col_weights must have shape \(4,\)"):
        loss(x0, y0, w, rw[:3], scale, bias)
    with pytest.raises(ValueError, match=r"rows and cols .* \(3, 5\) and \(4, 4\)"):
        loss(x0, y0[:, :4], w, rw, scale, bias)
    with pytest.raises(ValueError, match="weights entries"):
        pair_sigmoid_loss(x0, y0, torch.full((3, 4), float("nan")), scale, bias)


def test_same_sample_weights_views_and_geco_text():
    # Image-image: 2 images x 3 views, view 5 is a padding slot.
    valid = torch.tensor([True] * 5 + [False])
    local, remote = views_local_weights(valid, samples=2, views=3)
    want = views_global_weights(valid[None], samples=2, views=3)
    # Rows are not masked here (the loss's row_valid does that, also against remote columns).
    torch.testing.assert_close(local[valid].double(), want[valid], **TOL)
    torch.testing.assert_close(local[5], torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(remote, -valid.float())

    # Text-text: rows = 3 captions; columns = captions, then a paraphrase (+1) and a negative
    # (-1) per caption; caption 1 has no GeCo negative (weight 0 -> absent everywhere).
    row_sample = torch.arange(3)
    col_sample = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    col_weight = torch.tensor([1, 1, 1, 1, 1, 1, -1, 0, -1])
    col_obj = torch.arange(9)
    local, remote = same_sample_weights(row_sample, col_sample, col_weight,
                                        same_object=(torch.arange(3), col_obj))
    want = torch.zeros(3, 9)
    for r in range(3):
        for c in range(9):
            if c == r or c == 7:  # itself; the missing negative of caption 1
                continue
            if col_sample[c] != r:
                want[r, c] = -1.0
            else:
                want[r, c] = 1.0 if c < 6 else -1.0
    torch.testing.assert_close(local, want)
    torch.testing.assert_close(remote, torch.tensor([-1.0] * 7 + [0.0, -1.0]))
    assert local.dtype == remote.dtype == torch.float32

    with pytest.raises(ValueError, match="col_weight entries"):
        same_sample_weights(row_sample, col_sample, torch.full((9,), 2.0))
    with pytest.raises(ValueError, match="row_sample must be a 1-D integer tensor"):
        same_sample_weights(row_sample.float(), col_sample, col_weight)
    with pytest.raises(ValueError, match=r"col_valid must be a bool tensor of shape \(9,\)"):
        same_sample_weights(row_sample, col_sample, col_weight, col_valid=torch.ones(9))
    with pytest.raises(ValueError, match="same_object"):
        same_sample_weights(row_sample, col_sample, col_weight, same_object=(col_obj, col_obj))


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_infonce_dense_matches_hand_written_smoothed_targets(eps):
    g = torch.Generator().manual_seed(5)
    x0, y0, scale = _unit(5, 4, g), _unit(5, 4, g), 6.0
    x, y, s = _leaf(x0), _leaf(y0), _scalar(scale)
    loss = infonce_loss(x, y, s, label_smoothing=eps)
    loss.backward()
    xr, yr, sr = _leaf(x0), _leaf(y0), _scalar(scale)
    ref = ref_infonce(xr, yr, sr, eps)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in ((x.grad, xr.grad), (y.grad, yr.grad), (s.grad, sr.grad)):
        torch.testing.assert_close(got, want, **TOL)
    # Without a process group the module is the dense loss.
    module = DistributedInfoNCELoss(label_smoothing=eps)
    torch.testing.assert_close(module(x0, y0, scale), ref.detach(), **TOL)


def test_infonce_validation():
    g = torch.Generator().manual_seed(6)
    x0, y0 = _unit(4, 3, g), _unit(3, 3, g)
    with pytest.raises(ValueError, match="same pairs"):
        infonce_loss(x0, y0, 5.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DistributedInfoNCELoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        infonce_loss(x0, x0, torch.ones(2))
    bf16 = infonce_loss(x0.bfloat16(), x0.bfloat16(), 5.0)
    assert bf16.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# MAE
# --------------------------------------------------------------------------------------------


def test_patchify_matches_loops_and_conv_order():
    g = torch.Generator().manual_seed(7)
    p, images = 4, torch.randn(2, 3, 8, 12, generator=g, dtype=torch.float64)
    got = patchify(images, p)
    assert got.shape == (2, 6, 48)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                for u in range(p):
                    for v in range(p):
                        for ch in range(3):
                            want = images[b, ch, i * p + u, j * p + v]
                            assert got[b, i * 3 + j, (u * p + v) * 3 + ch] == want
    # Same patch order as a stride-p Conv2d, flattened: conv with weight K == patches @ K in (p, p, C).
    kernel = torch.randn(5, 3, p, p, generator=g, dtype=torch.float64)
    conv = F.conv2d(images, kernel, stride=p).flatten(2).transpose(1, 2)  # [B, S, 5]
    torch.testing.assert_close(got @ kernel.permute(2, 3, 1, 0).reshape(-1, 5), conv, **TOL)
    with pytest.raises(ValueError, match="divisible by patch=5"):
        patchify(images, 5)


def test_mae_targets_norm_pix_formula():
    g = torch.Generator().manual_seed(8)
    images = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 3 + 1
    raw = patchify(images, 2)
    torch.testing.assert_close(mae_targets(images, 2, norm_pix=False), raw, **TOL)
    got = mae_targets(images, 2, norm_pix=True)
    for b in range(2):
        for s in range(4):
            vals = raw[b, s].tolist()
            n = len(vals)
            mean = sum(vals) / n
            var = sum((v - mean) ** 2 for v in vals) / (n - 1)  # unbiased, as MAE's .var()
            want = torch.tensor([(v - mean) / math.sqrt(var + 1e-6) for v in vals], dtype=torch.float64)
            torch.testing.assert_close(got[b, s], want, **TOL)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_unfold_reference_value_and_grad(norm_pix):
    g = torch.Generator().manual_seed(9)
    p, images = 4, torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    _, masked = mae_mask(["a", "b", "c"], step=0, seed=0, num_patches=4, num_visible=1)
    pred0 = torch.randn(3, 3, p * p * 3, generator=g, dtype=torch.float64)
    pred = _leaf(pred0)
    loss = mae_loss(pred, images, masked, p, norm_pix)
    loss.backward()

    # Reference: F.unfold gives (C, p, p)-ordered columns; reorder to (p, p, C) by hand.
    cols = F.unfold(images, p, stride=p).reshape(3, 3, p, p, 4).permute(0, 4, 2, 3, 1).reshape(3, 4, -1)
    pr = _leaf(pred0)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(3):
        for m in range(3):
            t = cols[b, int(masked[b, m])]
            if norm_pix:
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
            total = total + ((pr[b, m] - t) ** 2).mean()
    ref = total / 9
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(pred.grad, pr.grad, **TOL)
    with pytest.raises(ValueError, match=r"pred must have shape \[B, M, p\*p\*C\] = \(3, 3, 48\)"):
        mae_loss(pred0[:, :2], images, masked, p, norm_pix)
    with pytest.raises(ValueError, match="masked_idx must be int64"):
        mae_loss(pred0, images, masked.int(), p, norm_pix)


def test_mae_mask_deterministic_per_key_and_partitions_patches():
    keys = ["img-0", "img-1", "img-2", "img-3"]
    vis, msk = mae_mask(keys, step=3, seed=11, num_patches=16, num_visible=4)
    assert vis.shape == (4, 4) and msk.shape == (4, 12)
    assert vis.dtype == msk.dtype == torch.int64
    for i in range(4):
        assert sorted(vis[i].tolist() + msk[i].tolist()) == list(range(16))
        assert vis[i].tolist() == sorted(vis[i].tolist()) and msk[i].tolist() == sorted(msk[i].tolist())
    # Same key -> same mask wherever it sits, whoever else is in the batch (another DP rank).
    vis2, msk2 = mae_mask(["other", "img-2", "img-0"], step=3, seed=11, num_patches=16, num_visible=4)
    assert torch.equal(vis2[1], vis[2]) and torch.equal(vis2[2], vis[0]) and torch.equal(msk2[1], msk[2])
    # Different step or seed -> different masks; distinct keys differ from each other.
    vis_step, _ = mae_mask(keys, step=4, seed=11, num_patches=16, num_visible=4)
    vis_seed, _ = mae_mask(keys, step=3, seed=12, num_patches=16, num_visible=4)
    assert not torch.equal(vis_step, vis) and not torch.equal(vis_seed, vis)
    assert len({tuple(r) for r in vis.tolist()}) > 1
    # Random-looking: over many keys every patch is visible sometimes.
    many, _ = mae_mask([str(i) for i in range(64)], step=0, seed=0, num_patches=16, num_visible=4)
    assert set(many.flatten().tolist()) == set(range(16))
    with pytest.raises(ValueError, match="num_visible must be in"):
        mae_mask(keys, step=0, seed=0, num_patches=16, num_visible=16)


# --------------------------------------------------------------------------------------------
# Causal text loss (single process: no megatron state -> full-vocab path)
# --------------------------------------------------------------------------------------------


def test_causal_text_loss_single_process_matches_reference():
    logits0, targets = text_problem(seed=10)
    logits = _leaf(logits0)
    loss = causal_text_loss(logits, targets, PAD_ID)
    loss.backward()
    ref_logits = _leaf(logits0)
    ref = ref_text_loss(ref_logits, targets, pad_id=0)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(logits.grad[3:, 0]) == 0  # padding positions get no gradient
    # Also equal to torch's cross entropy with ignore_index.
    want = F.cross_entropy(logits0.permute(1, 2, 0), targets, ignore_index=0)
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-6)
    # All padding: 0, not NaN. Another pad id is honoured.
    assert float(causal_text_loss(logits0, torch.zeros_like(targets), PAD_ID)) == 0.0
    ref_pad3 = ref_text_loss(logits0, targets, pad_id=3)
    torch.testing.assert_close(causal_text_loss(logits0, targets, pad_id=3).double(), ref_pad3,
                               atol=1e-6, rtol=1e-6)


def test_causal_text_loss_validation():
    logits0, targets = text_problem(seed=11)
    with pytest.raises(ValueError, match=r"targets must be int64 \[B, L\] = \(3, 5\)"):
        causal_text_loss(logits0, targets.T, PAD_ID)
    bad = targets.clone()
    bad[1, 1] = 8
    with pytest.raises(ValueError, match=r"token ids in \[0, 8\).*\[8\]"):
        causal_text_loss(logits0, bad, PAD_ID)
    with pytest.raises(ValueError, match="L, B, V_local"):
        causal_text_loss(logits0[0], targets, PAD_ID)


def _captions(lengths, seq: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Tokenizer layout: ids, eos (1), then pad (0); `lengths` include the eos."""
    tokens = torch.randint(3, vocab, (len(lengths), seq), generator=g)
    for i, n in enumerate(lengths):
        tokens[i, n - 1], tokens[i, n:] = 1, 0
    return tokens


def test_causal_text_loss_step_divisor_makes_the_split_irrelevant():
    """Captions of 2, 3, 8 and 8 tokens split into 2 + 2 micro-batches (or 2 DP ranks): a mean
    of per-micro-batch means is not the token mean; each micro-batch's sum divided by the
    step's token count per micro-batch (losses/token_count.py) gives the dense value and
    gradient, as megatron's schedule would combine them (each micro loss / num micro-batches)."""
    from tulip_mega.losses.token_count import step_token_divisor

    g = torch.Generator().manual_seed(30)
    lengths, seq, vocab = (2, 3, 8, 8), 8, 50
    logits0 = torch.randn(seq, 4, vocab, generator=g, dtype=torch.float64) * 2.0
    targets = _captions(lengths, seq, vocab, g)
    dense_logits = _leaf(logits0)
    dense = F.cross_entropy(dense_logits.permute(1, 2, 0), targets, ignore_index=0)  # plain PyTorch token mean
    dense.backward()
    micro = [(slice(0, 2), targets[:2]), (slice(2, 4), targets[2:])]

    # Without the step's count a short caption's tokens weigh 21/10 = 2.1x, a full one's 21/32.
    naive_logits = _leaf(logits0)
    naive = sum(causal_text_loss(naive_logits[:, s], t, PAD_ID) for s, t in micro) / 2
    naive.backward()
    ratio = naive_logits.grad[0, :, 0] / dense_logits.grad[0, :, 0]  # first position of every caption
    torch.testing.assert_close(ratio, torch.tensor([2.1, 2.1, 21 / 32, 21 / 32], dtype=torch.float64), rtol=1e-5, atol=0)
    assert abs(float(naive) - float(dense)) > 1e-4

    divisor = step_token_divisor([t for _, t in micro], pad_id=0, num_microbatches=2, group=None,
                                 device=torch.device("cpu"))
    assert divisor == (2 + 3 + 8 + 8) / 2
    split_logits = _leaf(logits0)
    total = sum(causal_text_loss(split_logits[:, s], t, PAD_ID, divisor=divisor) / 2 for s, t in micro)
    total.backward()
    # causal_text_loss works in float32: equal to the float64 reference to float32 rounding.
    torch.testing.assert_close(total.double(), dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(split_logits.grad, dense_logits.grad, atol=1e-7, rtol=1e-5)
    # A step of padding only: divisor 1, loss 0.
    assert step_token_divisor([torch.zeros(2, 3, dtype=torch.long)], 0, 1, None, torch.device("cpu")) == 1.0
    with pytest.raises(ValueError, match="divisor must be > 0, got 0"):
        causal_text_loss(logits0, targets, PAD_ID, divisor=0)


# --------------------------------------------------------------------------------------------
# Distributed: one 2-rank spawn runs every check
# --------------------------------------------------------------------------------------------


def _run_pair(rank, rows_g, cols_g, local_w, remote_w, scale, bias, dtype, row_valid=None):
    r, c = local_w.shape
    rows = _leaf(rows_g[rank * r:(rank + 1) * r].to(dtype))
    cols = _leaf(cols_g[rank * c:(rank + 1) * c].to(dtype))
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, requires_grad=True)
    loss = DistributedPairSigmoidLoss()(rows, cols, local_w, remote_w, s, b, row_valid=row_valid)
    loss.backward()
    return [loss.detach(), rows.grad, cols.grad, s.grad, b.grad]


def _dist_worker() -> dict:
    from megatron.core import parallel_state

    from tulip_mega.parallel.init import init_parallel

    rank = dist.get_rank()
    out = {}
    x, y, local, remote, scale, bias = pair_problem(seed=20)
    for dtype in (torch.float64, torch.float32):
        out[("pair", str(dtype))] = _run_pair(rank, x, y, local[rank], remote[rank], scale, bias, dtype)
    v, valid, vscale, vbias = views_problem(seed=21)
    lw, rw = views_local_weights(valid[rank], samples=2, views=3)
    out["views"] = _run_pair(rank, v, v.clone(), lw, rw, vscale, vbias, torch.float64, row_valid=valid[rank])

    g = torch.Generator().manual_seed(22)
    xi, yi = _unit(WORLD * 3, 4, g), _unit(WORLD * 3, 4, g)
    for eps in (0.0, 0.1):
        xl, yl, s = _leaf(xi[rank * 3:(rank + 1) * 3]), _leaf(yi[rank * 3:(rank + 1) * 3]), _scalar(5.0)
        loss = DistributedInfoNCELoss(label_smoothing=eps)(xl, yl, s)
        loss.backward()
        out[("infonce", eps)] = [loss.detach(), xl.grad, yl.grad, s.grad]

    # Causal text at TP=2 (DP=1): each rank holds half the vocabulary of the same logits.
    init_parallel(2, 1, seed=0)
    logits, targets = text_problem(seed=23, vocab=8)
    part = _leaf(logits[:, :, rank * 4:(rank + 1) * 4].float())
    loss = causal_text_loss(part, targets, PAD_ID)
    loss.backward()
    out["text_tp2"] = [loss.detach(), part.grad]
    parallel_state.destroy_model_parallel()
    # TP=1 through megatron's vocab-parallel function (DP=2: each rank its own batch).
    init_parallel(1, 1, seed=0)
    logits, targets = text_problem(seed=24 + rank)
    full = _leaf(logits.float())
    loss = causal_text_loss(full, targets, PAD_ID)
    loss.backward()
    out["text_tp1"] = [loss.detach(), full.grad]
    return out


def _dense(fn, *tensors):
    leaves = [_leaf(t) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _check_dp(per_rank, ref_loss, ref_grads, kinds, tol):
    """kinds[i]: 'rows' (concat over ranks, / DP) or 'scalar' (mean over ranks) for output i+1."""
    torch.testing.assert_close(torch.stack([r[0] for r in per_rank]).double().mean(), ref_loss, **tol)
    for i, (kind, want) in enumerate(zip(kinds, ref_grads), start=1):
        if kind == "rows":
            got = torch.cat([r[i] for r in per_rank]).double() / WORLD
        else:
            got = torch.stack([r[i] for r in per_rank]).double().mean()
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"output {i} ({kind}): {m}")


@pytest.mark.multiprocess
def test_distributed_terms_match_dense_references():
    results = run_distributed(_dist_worker, WORLD, timeout=180)
    kinds = ["rows", "rows", "scalar", "scalar"]

    x, y, local, remote, scale, bias = pair_problem(seed=20)
    weights = pair_global_weights(local, remote)
    ref = _dense(lambda a, b, s, t: ref_pair_loss(a, b, weights, s, t),
                 x, y, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    _check_dp([r[("pair", "torch.float64")] for r in results], *ref, kinds, TOL)
    _check_dp([r[("pair", "torch.float32")] for r in results], *ref, kinds, dict(atol=1e-5, rtol=1e-5))

    v, valid, vscale, vbias = views_problem(seed=21)
    weights = views_global_weights(valid, samples=2, views=3)
    # Rows and columns are the same views: the dense gradient is the sum of both roles.
    vs, vb = torch.tensor(vscale, dtype=torch.float64), torch.tensor(vbias, dtype=torch.float64)
    loss, (gv, gs, gb) = _dense(lambda a, s, t: ref_pair_loss(a, a, weights, s, t), v, vs, vb)
    per_rank = [r["views"] for r in results]
    torch.testing.assert_close(torch.stack([r[0] for r in per_rank]).mean(), loss, **TOL)
    g_views = torch.cat([r[1] + r[2] for r in per_rank]) / WORLD
    torch.testing.assert_close(g_views, gv, **TOL)
    torch.testing.assert_close(torch.stack([r[3] for r in per_rank]).mean(), gs, **TOL)
    torch.testing.assert_close(torch.stack([r[4] for r in per_rank]).mean(), gb, **TOL)

    g = torch.Generator().manual_seed(22)
    xi, yi = _unit(WORLD * 3, 4, g), _unit(WORLD * 3, 4, g)
    for eps in (0.0, 0.1):
        s5 = torch.tensor(5.0, dtype=torch.float64)
        ref = _dense(lambda a, b, s: ref_infonce(a, b, s, eps), xi, yi, s5)
        _check_dp([r[("infonce", eps)] for r in results], *ref, ["rows", "rows", "scalar"], TOL)
    a, b = results[0][("infonce", 0.1)][0], results[1][("infonce", 0.1)][0]
    assert abs(float(a - b)) > 1e-6  # the ranks really computed different rows

    logits, targets = text_problem(seed=23, vocab=8)
    ref_loss, (ref_grad,) = _dense(lambda t: ref_text_loss(t, targets, 0), logits)
    for r in results:  # TP ranks agree on the loss
        torch.testing.assert_close(r["text_tp2"][0].double(), ref_loss, atol=1e-6, rtol=1e-6)
    grad = torch.cat([results[0]["text_tp2"][1], results[1]["text_tp2"][1]], dim=2).double()
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    for rank, r in enumerate(results):
        logits, targets = text_problem(seed=24 + rank)
        ref_loss, (ref_grad,) = _dense(lambda t: ref_text_loss(t, targets, 0), logits)
        torch.testing.assert_close(r["text_tp1"][0].double(), ref_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["text_tp1"][1].double(), ref_grad, atol=1e-6, rtol=1e-6)
