"""Guards of the embedding cache (training/embedding_cache.py, loss.contrastive_batch=global).

The cache is exact only if the gradient pass reproduces the cache pass's contrastive outputs:
same weights, same host batches, same MAE masks (keyed by sample and step), and no layer
that draws random numbers in the forward. Nothing in a recipe can switch one on today
(models/megatron_config.py fixes hidden and attention dropout at 0; there is no drop-path;
augmentation happens in the loader, once per step), so:

  * `stochastic_layers` lists any dropout / drop-path-like layer in the model, and the step
    refuses to build an embedding cache over one (a future layer cannot break it silently);
  * `CacheCheck` (`train.check_cache`) compares, in the gradient pass, every replayed
    contrastive output with the cached one and reports the worst relative difference, so the
    step can stop loudly past `tolerance(...)`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from tulip_mega.losses.outputs import ModelOutputs

# max |replayed - cached| / max |cached| allowed per output, by compute precision. A replay runs
# the same kernels on the same inputs, so it is normally bit-identical; the tolerances leave
# room for kernels that are not deterministic (atomics) and their rounding: fp32 ~80 ulps of
# a unit-norm embedding, bf16 ~3 ulps (2^-8 = 0.0039), FP8 twice bf16, since an FP8 GEMM
# quantizes its inputs to 3 mantissa bits and one bf16 ulp upstream can move a value by a
# whole e4m3 step. train.check_cache_tolerance overrides them.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp8": 2e-2}


def tolerance(precision, override: Optional[float] = None) -> float:
    """The relative tolerance of train.check_cache for this recipe's precision section."""
    if override is not None:
        return float(override)
    if getattr(precision, "fp8", None) is not None:
        return TOLERANCE["fp8"]
    from tulip_mega.parallel.init import compute_dtype

    return TOLERANCE[compute_dtype(precision.dtype)]


def stochastic_layers(roots: Iterable[torch.nn.Module]) -> list[str]:
    """Names of the layers under `roots` that draw random numbers in a training forward: a
    dropout module with p > 0, a module with a `dropout_p` / `attention_dropout` /
    `drop_path` rate > 0 (our attention, TE's DotProductAttention, timm-style drop-path), or
    a megatron TransformerConfig with hidden / attention dropout > 0."""
    found: list[str] = []
    for root in roots:
        for name, module in root.named_modules():
            rates = {}
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                rates["p"] = module.p
            for attr in ("dropout_p", "attention_dropout", "drop_prob", "drop_path"):
                value = getattr(module, attr, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rates[attr] = value
            config = getattr(module, "config", None)
            for attr in ("hidden_dropout", "attention_dropout"):
                value = getattr(config, attr, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rates[f"config.{attr}"] = value
            found += [f"{name or type(module).__name__}.{k}={v}" for k, v in rates.items() if v > 0]
    return sorted(set(found))


class CacheCheck:
    """train.check_cache: the worst relative difference per output key between the gradient
    pass's contrastive outputs and the cached ones, over the micro-batches of one step."""

    def __init__(self, tol: float) -> None:
        self.tol = tol
        self.cached: list[dict[str, torch.Tensor]] = []
        self.worst: dict[str, tuple[float, float, int]] = {}  # key -> (relative, max abs diff, micro)

    def keep(self, cached: list[dict[str, torch.Tensor]]) -> None:
        """The cache pass's outputs of this step, one dict per micro-batch (last stage)."""
        self.cached, self.worst = cached, {}

    def compare(self, output: ModelOutputs, micro: int) -> None:
        """Record how far micro-batch `micro`'s replayed outputs are from the cached ones."""
        for key, ref in self.cached[micro].items():
            got = output.tensors()[key].detach().to(ref.dtype)
            diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
            scale = max(float(ref.abs().max()), 1e-12)
            rel = diff / scale
            if rel != rel:  # NaN: the non-finite guard owns that case
                continue
            if key not in self.worst or rel > self.worst[key][0]:
                self.worst[key] = (rel, diff, micro)

    def failure(self, step: int) -> Optional[str]:
        """A message when an output differs by more than the tolerance, on every rank (one
        all-reduce of the worst ratio; the message itself travels only on a failure)."""
        rel = max((w[0] for w in self.worst.values()), default=0.0)
        from tulip_mega.parallel.init import device

        flag = torch.tensor([rel], dtype=torch.float64, device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag.item()) <= self.tol:
            self.cached, self.worst = [], {}
            return None
        mine = None
        if rel > self.tol:
            bad = sorted(((k, w) for k, w in self.worst.items() if w[0] > self.tol), key=lambda kw: -kw[1][0])
            streams = "; ".join(f"{k}: max abs diff {w[1]:.3g} (relative {w[0]:.3g}) in micro-batch {w[2]}"
                                for k, w in bad)
            mine = (f"step {step}: train.check_cache: the gradient pass's contrastive outputs differ from the "
                    f"cached ones beyond the tolerance {self.tol:g} (relative to the largest cached value): "
                    f"{streams}. The global contrastive batch needs a replayable forward: look for dropout, "
                    "drop-path or other randomness in the towers, or an FP8 scaling state that changed between "
                    "the passes (docs/losses.md); loss.contrastive_batch=micro needs no replay")
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self.cached, self.worst = [], {}
        return next(m for m in everyone if m is not None)
