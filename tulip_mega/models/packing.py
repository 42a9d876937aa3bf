"""Pack the activations of both towers into one tensor for megatron's pipeline p2p.

megatron's schedules send exactly one tensor of shape (rows, micro_batch, width) between
stages. Every stage holds a slice of the vision AND the text tower, so both towers' hidden
states [s, b, h] travel together: each is laid out as rows of a common width
(gcd of the two hidden sizes) and the rows are concatenated. With equal hidden sizes (the
usual case) this is a plain `torch.cat` along the sequence; otherwise a permute+copy.
The packed tensor is always a fresh tensor (never a view), as megatron's output
deallocation requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TowerActivationPacker:
    """Knows the per-rank activation shapes of both towers on a pipeline boundary."""

    vision_seq: int  # sequence length on this rank (already divided by TP under sequence parallel)
    vision_hidden: int
    text_seq: int
    text_hidden: int

    @property
    def width(self) -> int:
        return math.gcd(self.vision_hidden, self.text_hidden)

    @property
    def vision_rows(self) -> int:
        return self.vision_seq * self.vision_hidden // self.width

    @property
    def text_rows(self) -> int:
        return self.text_seq * self.text_hidden // self.width

    def shape(self, micro_batch: int) -> tuple[int, int, int]:
        """The p2p tensor shape (rows, micro_batch, width) megatron must allocate."""
        return (self.vision_rows + self.text_rows, micro_batch, self.width)

    def _to_rows(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        k = h // self.width
        if k == 1:
            return x
        # [s, b, h] -> [s, b, k, W] -> [s, k, b, W] -> [s*k, b, W]
        return x.reshape(s, b, k, self.width).permute(0, 2, 1, 3).reshape(s * k, b, self.width)

    def _from_rows(self, rows: torch.Tensor, seq: int, hidden: int) -> torch.Tensor:
        k = hidden // self.width
        if k == 1:
            return rows
        b = rows.shape[1]
        # [s*k, b, W] -> [s, k, b, W] -> [s, b, k, W] -> [s, b, h]
        return rows.reshape(seq, k, b, self.width).permute(0, 2, 1, 3).reshape(seq, b, hidden)

    def pack(self, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[s_v, b, h_v] and [s_t, b, h_t] -> [rows, b, W] (a new tensor)."""
        expected_v = (self.vision_seq, self.vision_hidden)
        expected_t = (self.text_seq, self.text_hidden)
        if (vision.shape[0], vision.shape[2]) != expected_v or (text.shape[0], text.shape[2]) != expected_t:
            raise ValueError(
                f"pipeline packing expected vision [s,b,h]=[{expected_v[0]},b,{expected_v[1]}] and text "
                f"[{expected_t[0]},b,{expected_t[1]}], got {tuple(vision.shape)} and {tuple(text.shape)}"
            )
        if vision.dtype != text.dtype:
            raise ValueError(f"both towers must share the pipeline dtype, got {vision.dtype} and {text.dtype}")
        return torch.cat([self._to_rows(vision), self._to_rows(text)], dim=0)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, b, W] -> ([s_v, b, h_v], [s_t, b, h_t])."""
        if packed.shape[0] != self.vision_rows + self.text_rows or packed.shape[2] != self.width:
            raise ValueError(
                f"received pipeline tensor of shape {tuple(packed.shape)}, expected "
                f"({self.vision_rows + self.text_rows}, b, {self.width})"
            )
        vision = self._from_rows(packed[: self.vision_rows], self.vision_seq, self.vision_hidden)
        text = self._from_rows(packed[self.vision_rows :], self.text_seq, self.text_hidden)
        return vision, text
