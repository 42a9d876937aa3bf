"""Pack every tower call of a pipeline stage into one tensor for megatron's pipeline p2p.

megatron's schedules send exactly one tensor between stages, and allocate it with their
default shape (seq_length, micro_batch, config.hidden_size), seq_length divided by TP under
sequence parallel. Every stage holds a slice of the vision AND the text tower, and one step may
run the vision tower several times (full-resolution views, low-resolution local crops, MAE
visible patches: one *stream* each, see tulip_mega/config/streams.py) and the text tower once
over all texts. Each sample's hidden states of every stream ([s, views*b, h], view-major) are
flattened, concatenated, zero-padded to a whole number of rows of the packed `width` (the
vision width, i.e. the schedule config's hidden_size) and laid out as [rows, b, width], the
micro-batch kept as the middle axis. So the schedules run with their default p2p shape and no
`adjust_tensor_shapes_fn` (which megatron's interleaved schedule refuses); the schedule is only
told `seq_length` = rows (x TP under sequence parallel). The packed tensor is always a fresh
tensor (never a view), as megatron's output deallocation requires.
"""

from __future__ import annotations

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
    width: int  # the packed row width: the pipeline schedule config's hidden_size

    def elements(self, part: PackedPart) -> int:
        """Values of one sample of `part`."""
        return part.seq * part.views * part.hidden

    def rows(self) -> int:
        return -(-sum(self.elements(p) for p in self.parts) // self.width)

    def shape(self, micro_batch: int) -> tuple[int, int, int]:
        """The p2p tensor shape (rows, micro_batch, width) megatron allocates."""
        return (self.rows(), micro_batch, self.width)

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: [s, views*b, h]} -> [rows, b, width] (a new tensor), in the order of `parts`."""
        if set(tensors) != {p.name for p in self.parts}:
            raise ValueError(f"pipeline packing expected parts {[p.name for p in self.parts]}, got {sorted(tensors)}")
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(f"every tower call must share the pipeline dtype, got {sorted(map(str, dtypes))}")
        flat = []
        for part in self.parts:
            x = tensors[part.name]
            if x.dim() != 3 or x.shape[0] != part.seq or x.shape[2] != part.hidden or x.shape[1] % part.views:
                raise ValueError(
                    f"pipeline packing expected {part.name} [s, views*b, h] = [{part.seq}, {part.views}*b, "
                    f"{part.hidden}], got {tuple(x.shape)}"
                )
            b = x.shape[1] // part.views
            # [s, v*b, h] -> [s, v, b, h] -> [b, s, v, h] -> [b, s*v*h]
            flat.append(x.reshape(part.seq, part.views, b, part.hidden).permute(2, 0, 1, 3).reshape(b, -1))
        rows = self.rows()
        pad = rows * self.width - sum(f.shape[1] for f in flat)
        if pad:
            flat.append(flat[0].new_zeros(flat[0].shape[0], pad))
        packed = torch.cat(flat, dim=1) if len(flat) > 1 else flat[0]
        # [b, rows*W] -> [rows, b, W], always a fresh contiguous tensor
        return packed.view(-1, rows, self.width).transpose(0, 1).clone(memory_format=torch.contiguous_format)

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """[rows, b, width] -> {name: [s, views*b, h]}."""
        rows = self.rows()
        if packed.dim() != 3 or (packed.shape[0], packed.shape[2]) != (rows, self.width):
            raise ValueError(
                f"received pipeline tensor of shape {tuple(packed.shape)}, expected ({rows}, b, {self.width}) "
                f"for parts {[(p.name, p.seq, p.views, p.hidden) for p in self.parts]}"
            )
        b = packed.shape[1]
        flat = packed.transpose(0, 1).reshape(b, rows * self.width)
        out, start = {}, 0
        for part in self.parts:
            n = self.elements(part)
            x = flat[:, start : start + n].reshape(b, part.seq, part.views, part.hidden)
            out[part.name] = x.permute(1, 2, 0, 3).reshape(part.seq, part.views * b, part.hidden)
            start += n
        return out
