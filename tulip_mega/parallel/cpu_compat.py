"""Make megatron-core's CUDA-assuming code paths run on a CPU-only machine (gloo backend).

megatron-core is written for GPUs: it allocates buffers with `device=torch.cuda.current_device()`
or a hard-coded `device="cuda"`, calls `torch.cuda.synchronize()`, and keeps dropout RNG
states in a CUDA RNG tracker. On a machine without CUDA all of those raise.

`apply()` fixes that without editing megatron: every loaded `megatron.core.*` module whose
global name `torch` is the torch package gets a thin proxy instead, which forwards everything
to torch except that

- tensor factories given a CUDA device put the tensor on the CPU,
- `torch.cuda.current_device()` answers "cpu", `synchronize()`/`empty_cache()` do nothing,
- the CUDA RNG functions act on the CPU generator (so the model-parallel RNG tracker works,
  with the same fork/restore semantics), and `Tensor.cuda()` is never reached because
  tensors are already on the CPU.

It is applied only when CUDA is absent (`apply()` is a no-op otherwise), so the GPU path runs
megatron exactly as shipped. This module is the only place that knows about these patches.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types
import warnings
from typing import Any

import torch

log = logging.getLogger(__name__)

# megatron-core modules with CUDA assumptions on the paths we use; imported before patching
# so their `torch` global exists. Modules imported later are patched by `apply()` too, as
# long as they are loaded by then (we call apply() after building the model, again).
_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.module",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "linspace",
)


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec to "cpu"; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


def _wrap_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


class _CpuCuda(types.ModuleType):
    """Stands in for `torch.cuda` inside megatron modules on a CPU-only machine."""

    def __init__(self) -> None:
        super().__init__("torch.cuda(cpu)")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def synchronize(*_a, **_k) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def get_rng_state(*_a, **_k) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_a, **_k) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def device(*_a, **_k):
        return contextlib.nullcontext()

    @staticmethod
    def nvtx_range_push(*_a, **_k) -> None:
        return None

    @staticmethod
    def nvtx_range_pop(*_a, **_k) -> None:
        return None

    # megatron's type checks compare `param.type()` strings against these.
    FloatTensor = torch.FloatTensor
    HalfTensor = torch.HalfTensor
    BFloat16Tensor = torch.BFloat16Tensor


class _CpuTorch(types.ModuleType):
    """Stands in for the `torch` package inside megatron modules on a CPU-only machine."""

    def __init__(self) -> None:
        super().__init__("torch(cpu)")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _wrap_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_PROXY: _CpuTorch | None = None


def needed() -> bool:
    """True when there is no CUDA device, i.e. when the patches must be applied."""
    from tulip_mega.parallel.init import use_cuda

    return not use_cuda()


def _patch_rng(random_mod: types.ModuleType) -> None:
    """The model-parallel RNG tracker keeps its states on the CPU generator."""
    random_mod._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """megatron's clip_grad_by_total_norm_fp32 minus its 'torch.cuda.FloatTensor' assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_grad_clip() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    for mod in (clip_grads, optimizer):
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu


def apply() -> bool:
    """Patch the loaded megatron-core modules for CPU. Returns True when patches were applied.

    Idempotent; safe to call again after more megatron modules were imported.
    """
    global _PROXY
    if not needed():
        return False
    if _PROXY is None:
        _PROXY = _CpuTorch()
        # CUDA stream advice that means nothing without CUDA.
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        log.debug("CUDA not available: applying megatron-core CPU compatibility patches")
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a module that moved between megatron-core versions
            log.debug("cpu_compat: %s not importable, skipped", name)
    for name, mod in list(sys.modules.items()):
        if not name.startswith("megatron.core") or mod is None:
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = _PROXY
        if name == "megatron.core.tensor_parallel.random":
            _patch_rng(mod)
    _patch_grad_clip()
    return True
