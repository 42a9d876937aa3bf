"""The embedding cache's gradient pass runs at the FP8 scales of its cache pass.

Under Transformer Engine's delayed scaling each FP8 module keeps, in
`module.fp8_meta["scaling_fwd"]`, an amax history and the scales its forward casts use
(`DelayedScalingRecipeState.scale` / `.amax_history`; the quantizers hold views of them:
transformer_engine/pytorch/quantization.py, TE 2.x). TE rolls the history and recomputes the
scales when the outermost `fp8_autocast` exits, which megatron-core 0.16.1 enters once per
`TransformerBlock` call under the delayed recipe (transformer_block.py,
`use_outer_quantization_context`), and only while grad is enabled
(`FP8GlobalStateManager.autocast_exit`: `if enabled and qstate.autocast_depth == 0 and not
_graph and torch.is_grad_enabled(): cls.reduce_and_update_fp8_tensors(forward=True)`). So in
one step of the global contrastive batch (training/embedding_cache.py):

  * the cache pass runs under `no_grad`: every micro-batch is cast with the scales S the step
    started with, and nothing is updated;
  * the gradient pass updates the scales after every tower call: without this module its
    micro-batch 1 (and, within a micro-batch, the contrastive views after the MAE stream)
    would be cast with newer scales than the cache saw, and the cached gradient would be
    applied at slightly different activations.

`Fp8ReplayScales` holds S through the gradient pass: a forward pre-hook on every TransformerBlock
holding delayed-scaling modules copies S back into their `scaling_fwd.scale` (in place: the
quantizers' views stay valid) before each block call. The amax history is left to TE in that pass (it records every forward and rolls
as usual), so the scales TE computes at the pass's last update are the next step's S: the
scales move once per step instead of once per tower call. The cache pass is also made to
leave no trace: the amax histories and scales are snapshotted before it and copied back after
it, and the cache pass holds S by the same hooks (both no-ops on the TE above; they keep S
on a version that updates under no_grad).
TE's own activation recompute keeps two forwards identical the same way
(`copy_forward_fp8_meta_tensors_for_recompute` / `get_old_fp8_meta_tensors_for_recompute`:
`scaling_fwd.amax_history` and `.scale`, cloned and copied back in place).

Only the GPU path with `precision.fp8` and `precision.fp8_recipe=delayed` uses this (selected in
`replay_guard`); modules without delayed-scaling state (current scaling, MXFP8, local layers)
are not touched.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Union

import torch

# The tensors of TE's forward delayed-scaling state that decide a cast: `scale` (TE 2.x);
# `scale_inv` is part of the state too in TE 1.x.
_SCALES = ("scale", "scale_inv")


def delayed_scaling_state(module: torch.nn.Module):
    """`module.fp8_meta["scaling_fwd"]` when it is delayed-scaling state (has an amax history
    and scales; TE creates it at the module's first FP8 forward), else None."""
    meta = getattr(module, "fp8_meta", None)
    state = meta.get("scaling_fwd") if isinstance(meta, dict) else None
    if state is None or not all(torch.is_tensor(getattr(state, k, None)) for k in ("amax_history", "scale")):
        return None
    return state


def _tensors(state, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {k: getattr(state, k) for k in names if torch.is_tensor(getattr(state, k, None))}


class Fp8ReplayScales:
    """See the module docstring. `cache_pass()` wraps the forward-only pass, `replay_pass()` the
    forward+backward pass that must reproduce its outputs."""

    def __init__(self, roots: Iterable[torch.nn.Module]) -> None:
        self.roots = list(roots)
        self._frozen: dict[torch.nn.Module, dict[str, torch.Tensor]] = {}

    def _modules(self) -> Iterator[tuple[torch.nn.Module, object]]:
        seen = set()
        for root in self.roots:
            for module in root.modules():
                state = delayed_scaling_state(module)
                if state is not None and id(module) not in seen:
                    seen.add(id(module))
                    yield module, state

    @contextlib.contextmanager
    def cache_pass(self) -> Iterator[None]:
        """The forward-only pass: cast with the step's scales S, full recompute off, FP8 state
        as it was before afterwards (restored in place); S recorded for `replay_pass`."""
        before = {m: {k: t.clone() for k, t in _tensors(s, ("amax_history", *_SCALES)).items()}
                  for m, s in self._modules()}
        scales = {m: {k: t for k, t in saved.items() if k in _SCALES} for m, saved in before.items()}
        with _no_full_recompute(self.roots), _holding(self.roots, scales):
            yield
        for module, saved in before.items():
            state = delayed_scaling_state(module)
            for k, t in saved.items():
                getattr(state, k).copy_(t)
        # Modules that first ran FP8 in this pass have just created their state: S is its value.
        self._frozen = {m: {k: t.clone() for k, t in _tensors(s, _SCALES).items()} for m, s in self._modules()}

    @contextlib.contextmanager
    def replay_pass(self) -> Iterator[None]:
        """The forward+backward pass: every forward of a module recorded by `cache_pass` casts
        with S; the hooks are gone afterwards."""
        try:
            with _holding(self.roots, self._frozen):
                yield
        finally:
            self._frozen = {}


@contextlib.contextmanager
def _holding(roots: list[torch.nn.Module], saved: dict[torch.nn.Module, dict[str, torch.Tensor]]) -> Iterator[None]:
    """Forward pre-hooks that copy `saved` (scale tensors by name) into each module's
    delayed-scaling state before it runs; removed on exit. TE updates the scales only when a
    block's autocast exits, so one hook per TransformerBlock copies all of its modules' scales
    at once (one `_foreach_copy_`); a module outside any block gets its own hook."""
    groups: dict[torch.nn.Module, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for module, owner in _owners(roots, saved).items():
        state = delayed_scaling_state(module)
        dsts, srcs = groups.setdefault(owner, ([], []))
        for k, t in saved[module].items():
            dsts.append(getattr(state, k))
            srcs.append(t)
    handles = [owner.register_forward_pre_hook(_copy_hook(dsts, srcs)) for owner, (dsts, srcs) in groups.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _owners(roots: list[torch.nn.Module], modules) -> dict[torch.nn.Module, torch.nn.Module]:
    """{module: the nearest TransformerBlock above it (or the module itself)} for `modules`."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    owner_of = {}
    stack = [(root, None) for root in roots]
    while stack:
        module, owner = stack.pop()
        if isinstance(module, TransformerBlock):
            owner = module
        if module in modules:
            owner_of[module] = owner if owner is not None else module
        stack.extend((child, owner) for child in module.children())
    return owner_of


def _copy_hook(dsts: list[torch.Tensor], srcs: list[torch.Tensor]):
    def hook(_module, _args) -> None:
        torch._foreach_copy_(dsts, srcs)
    return hook


@contextlib.contextmanager
def _no_full_recompute(roots: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Full activation recompute off for the blocks under `roots` (their TransformerConfigs'
    `recompute_granularity`, read by `TransformerBlock.forward`), restored afterwards.

    Why, for the cache pass: under FP8 megatron checkpoints through TE's `checkpoint`, whose
    first forward pushes a copy of the FP8 meta onto a queue that only the backward's recompute
    pops (`copy_forward_fp8_meta_tensors_for_recompute`); a no_grad pass has no backward, so its
    copies would stay queued and the gradient pass's recompute would pop them. A no_grad
    forward keeps no activations, so recompute has nothing to save there anyway."""
    configs = {}
    for root in roots:
        for module in root.modules():
            config = getattr(module, "config", None)
            if getattr(config, "recompute_granularity", None) == "full":
                configs[id(config)] = config
    for config in configs.values():
        config.recompute_granularity = None
    try:
        yield
    finally:
        for config in configs.values():
            config.recompute_granularity = "full"


class _NoReplayGuard:
    """Without delayed FP8 scaling both passes are reproducible as they are."""

    @contextlib.contextmanager
    def cache_pass(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def replay_pass(self) -> Iterator[None]:
        yield


def replay_guard(precision, roots: Iterable[torch.nn.Module]) -> Union[Fp8ReplayScales, _NoReplayGuard]:
    """`Fp8ReplayScales` for a recipe with FP8 delayed scaling (`precision.fp8` set and
    `precision.fp8_recipe=delayed`), else a guard that does nothing."""
    if getattr(precision, "fp8", None) is not None and getattr(precision, "fp8_recipe", None) == "delayed":
        return Fp8ReplayScales(roots)
    return _NoReplayGuard()

