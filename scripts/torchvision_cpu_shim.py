"""Lets PyPI's torchvision import beside the CPU-only torch that scripts/install_cpu.sh installs.

Why: open_clip (the `convert --to open_clip` tests) needs torchvision, and PyPI's torchvision
0.28 for torch 2.13 is a CUDA build: its compiled extension cannot load against the CPU torch,
and its import then fails while registering fake kernels for `torchvision::nms` / `qnms`
("operator torchvision::nms does not exist"), which also breaks every library that imports
torchvision when it is installed (transformers). There is no CPU torchvision wheel of that
version on PyPI. Defining the two operator schemas (no kernels) before torchvision's first
import lets its Python part (transforms, what open_clip and transformers use) import and work;
its compiled ops (nms, roi_align, video/image decoders) stay unavailable, as they already were.

install_cpu.sh copies this file into the venv's site-packages as `_tulip_torchvision_cpu_shim.py`
with a `.pth` line that imports it at start-up; it does nothing until torchvision is imported,
and nothing at all with a CUDA build of torch (where torchvision's own extension loads). GPU
machines never install it.
"""

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []  # keeps the torch.library.Library alive (its definitions die with it)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """On the first `import torchvision`: define the schemas, then let the normal import run."""

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002 (MetaPathFinder API)
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            import torch

            if torch.version.cuda is None:  # a CPU build: torchvision's CUDA extension cannot load
                lib = torch.library.Library("torchvision", "DEF")
                for schema in _SCHEMAS:
                    lib.define(schema)
                _libraries.append(lib)
        except Exception:  # never break an import that would otherwise have worked
            pass
        return None


sys.meta_path.insert(0, _BeforeTorchvision())
