"""Helpers every contrastive loss shares (sigmoid, pairwise sigmoid, InfoNCE): the
data-parallel group's rank/size, the all-gather with gradient, logits in the compute dtype,
scalar handling and input checks. One copy here; the loss modules import from it.

None of these syncs the device on a GPU: value checks of weight tensors are device-side
asserts there (`check_weights`).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

ScalarLike = Union[torch.Tensor, float]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, otherwise the input dtype (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def as_scalar(name: str, value: ScalarLike, like: torch.Tensor) -> torch.Tensor:
    """A one-element tensor for `logit_scale` / `logit_bias`, keeping a caller's tensor as is.

    The caller's tensor must be returned unchanged (not reshaped/cast) so autograd delivers the
    gradient to it; the casts to the compute dtype happen inside the loss.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold exactly one element, got shape {tuple(value.shape)}")
        return value
    return torch.tensor(float(value), dtype=compute_dtype(like.dtype), device=like.device)


def pair_logits(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """s * x @ y.T + b in the compute dtype. x [B, D], y [N, D] -> [B, N]."""
    cdtype = compute_dtype(x.dtype)
    raw = (x @ y.T).to(cdtype)  # [B, N]
    return scale.reshape(()).to(cdtype) * raw + bias.reshape(()).to(cdtype)


def rank_and_world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank in `group`, size of `group`); (0, 1) when torch.distributed is not initialised.

    Lets every loss run unchanged in a single process (unit tests, DP=1 debugging).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the given data-parallel group")
    return rank, dist.get_world_size(group)


def check_embeddings(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Both 2-D with the same embedding dim; the message names the two arguments."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{names[0]} and {names[1]} must be 2-D [batch, dim], got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same embedding dim, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def require_all(valid: torch.Tensor, message: Callable[[], str]) -> None:
    """Raise ValueError(message()) unless every element of the bool tensor `valid` is true.

    On a CPU tensor that reads the values (no device to wait for). On a GPU it is a device-side
    assert instead (`torch._assert_async`): the hot path never waits for the device, and a bad
    value still stops the run (as a CUDA error, at the next sync)."""
    if valid.device.type != "cpu":
        torch._assert_async(valid.all())
    elif not bool(valid.all()):
        raise ValueError(message())


def check_weights(name: str, w: torch.Tensor, shape: tuple[int, ...], allowed: tuple[float, ...]) -> None:
    """Shape, numeric dtype and values of a weight tensor.

    On a CPU tensor a bad value raises ValueError naming it. On a GPU the value check is a
    device-side assert (`torch._assert_async`), so the per-micro-batch hot path never waits
    for the device; the loss stack builds its weights from {-1, 0, +1} by construction."""
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(w.shape)}")
    if w.dtype == torch.bool or w.is_complex():
        # True/False would silently read as positive/ignored, never as negative.
        raise ValueError(
            f"{name} must be a numeric (float or int) tensor with entries in {allowed}, got {w.dtype}"
        )
    valid = torch.zeros_like(w, dtype=torch.bool)
    for v in allowed:
        valid |= w == v  # NaN matches nothing, so it is rejected too

    def message() -> str:
        bad = w[~valid].flatten()[:5].tolist()
        words = [f"{v:+g}" if v > 0 else f"{v:g}" for v in sorted(allowed)]
        return f"{name} entries must be in {allowed} ({', '.join(words[:-1])} or {words[-1]}), found e.g. {bad}"

    require_all(valid, message)


class AllGatherRows(torch.autograd.Function):
    """[B, D] per rank -> [W*B, D] in group-rank order; backward reduce-scatters (sums).

    The sum is right for the DP contract: every rank differentiates its own loss, so the
    gradient for rank r's block is the sum over ranks of their contributions.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, t: torch.Tensor, group: Optional[dist.ProcessGroup], world: int
    ) -> torch.Tensor:
        ctx.group = group
        t = t.contiguous()
        out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))  # [W*B, D]
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()  # [W*B, D]
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))  # [B, D]
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None, None
