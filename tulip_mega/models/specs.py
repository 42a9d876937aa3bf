"""Layer specs: Transformer Engine when it imports, megatron-core's local (pure PyTorch) otherwise."""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """True when `transformer_engine.pytorch` imports (it needs CUDA, cuDNN and a GPU build)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # ImportError, OSError (missing libcudnn), RuntimeError (no CUDA)
        return False
    return True
