"""Pack every tower call of a pipeline stage into one tensor for megatron's pipeline p2p.

megatron's schedules send exactly one tensor of shape (rows, micro_batch, width) between
stages. Every stage holds a slice of the vision AND the text tower, and one step may run the
vision tower several times (full-resolution views, low-resolution local crops, MAE visible
patches: one *stream* each, see tulip_mega/config/streams.py) and the text tower once over
all texts. Each stream's hidden states [s, views*b, h] (view-major) travel together: they are
laid out as rows of a common width W (gcd of the hidden sizes) with the micro-batch kept as
the middle axis, and the rows of all streams are concatenated. The packed tensor is always a
fresh tensor (never a view), as megatron's output deallocation requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedPart:
    """One tower call crossing a pipeline boundary: [seq, views * b, hidden] on this rank."""

    name: str
    seq: int  # tokens per view on this rank (already divided by TP under sequence parallel)
    views: int  # views per sample (the tower's batch is views * micro_batch, view-major)
    hidden: int


@dataclass(frozen=True)
class ActivationPacker:
    """Knows the per-rank activation shapes of every part on a pipeline boundary."""

    parts: tuple[PackedPart, ...]

    @property
    def width(self) -> int:
        return math.gcd(*(p.hidden for p in self.parts))

    def rows(self, part: PackedPart) -> int:
        return part.seq * part.views * (part.hidden // self.width)

    def shape(self, micro_batch: int) -> tuple[int, int, int]:
        """The p2p tensor shape (rows, micro_batch, width) megatron must allocate."""
        return (sum(self.rows(p) for p in self.parts), micro_batch, self.width)

    def _to_rows(self, x: torch.Tensor, part: PackedPart) -> torch.Tensor:
        s, vb, h = x.shape
        b, k = vb // part.views, h // self.width
        # [s, v*b, h] -> [s, v, b, k, W] -> [s, v, k, b, W] -> [s*v*k, b, W]
        return x.reshape(s, part.views, b, k, self.width).permute(0, 1, 3, 2, 4).reshape(-1, b, self.width)

    def _from_rows(self, rows: torch.Tensor, part: PackedPart) -> torch.Tensor:
        b, k = rows.shape[1], part.hidden // self.width
        # [s*v*k, b, W] -> [s, v, k, b, W] -> [s, v, b, k, W] -> [s, v*b, h]
        x = rows.reshape(part.seq, part.views, k, b, self.width).permute(0, 1, 3, 2, 4)
        return x.reshape(part.seq, part.views * b, part.hidden)

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: [s, views*b, h]} -> [rows, b, W] (a new tensor), in the order of `parts`."""
        if set(tensors) != {p.name for p in self.parts}:
            raise ValueError(f"pipeline packing expected parts {[p.name for p in self.parts]}, got {sorted(tensors)}")
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(f"every tower call must share the pipeline dtype, got {sorted(map(str, dtypes))}")
        out = []
        for part in self.parts:
            x = tensors[part.name]
            if x.dim() != 3 or x.shape[0] != part.seq or x.shape[2] != part.hidden or x.shape[1] % part.views:
                raise ValueError(
                    f"pipeline packing expected {part.name} [s, views*b, h] = [{part.seq}, {part.views}*b, "
                    f"{part.hidden}], got {tuple(x.shape)}"
                )
            out.append(self._to_rows(x, part))
        return torch.cat(out, dim=0) if len(out) > 1 else out[0].clone()

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """[rows, b, W] -> {name: [s, views*b, h]} (views of the received tensor)."""
        expected = self.shape(packed.shape[1])
        if packed.dim() != 3 or (packed.shape[0], packed.shape[2]) != (expected[0], expected[2]):
            raise ValueError(
                f"received pipeline tensor of shape {tuple(packed.shape)}, expected ({expected[0]}, b, {expected[2]}) "
                f"for parts {[(p.name, p.seq, p.views, p.hidden) for p in self.parts]}"
            )
        out, start = {}, 0
        for part in self.parts:
            n = self.rows(part)
            out[part.name] = self._from_rows(packed[start : start + n], part)
            start += n
        return out
