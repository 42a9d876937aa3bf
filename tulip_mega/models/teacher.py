"""The EMA teacher of SigLIP 2's self-distillation terms, as state of one model part.

SigLIP 2 (section 2.3, after SILC and TIPS) adds a teacher whose weights are an exponential
moving average of the student's vision tower and projection heads, copied from the student
when the terms switch on (`loss.distill.start_fraction`). Here the teacher's modules live in
the same `TulipModel` part as the student's, under the student's names with the prefix
`teacher_`: so the teacher is built from the same layer specs, split over TP x PP x virtual
stages exactly like the student, saved and resharded by the same `sharded_state_dict`, and the
EMA update is a purely local elementwise operation on every rank (no communication).

Precision: the teacher's weights are kept in float32 whatever the compute dtype. Under bf16 an
EMA step moves a weight by (1 - momentum) x (student - teacher), far below bf16's resolution
at DINO's momenta (0.996 -> 1): a bf16 teacher would not move. Its forward runs under
`torch.autocast` in the compute dtype, so it costs what a bf16 forward costs.

Centres (DINO's centering of the teacher's outputs) are float32 buffers on the last stage,
updated once per applied optimizer step from the teacher outputs of the whole global batch.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Optional

import torch
import torch.distributed as dist

TEACHER_PREFIX = "teacher_"
CENTERS = {"distill_teacher": "distill_center", "masked_teacher": "patch_center"}


def teacher_momentum(step: int, total: int, start: float, end: float) -> float:
    """DINO's cosine EMA schedule: `start` at step 0 of the teacher's `total` steps, `end` at
    the last. `step` counts optimizer steps since the teacher was copied from the student."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


class TeacherState:
    """The teacher side of one model part: which tensors pair with which student tensors, how
    the teacher encodes, and the centre statistics of the current step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = weakref.ref(model)  # the part owns this object; no reference cycle
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    @property
    def model(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model part of this teacher was freed")
        return model

    # --- structure -------------------------------------------------------------------------
    def pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(teacher name, teacher tensor, student tensor) for every teacher parameter of this part."""
        params = dict(self.model.named_parameters())
        out = []
        for name, param in params.items():
            if name.startswith(TEACHER_PREFIX):
                student = name[len(TEACHER_PREFIX):]
                if student not in params:
                    raise RuntimeError(f"teacher parameter {name} has no student parameter {student}")
                out.append((name, param, params[student]))
        return out

    def modules(self) -> list[torch.nn.Module]:
        return [m for name, m in self.model.named_children() if name.startswith(TEACHER_PREFIX)]

    def freeze_and_keep_fp32(self) -> None:
        """Exclude the teacher from autograd (so from DDP and the optimizer) and keep its weights
        and the centres in float32 (see the module docstring). Call after the model's dtype cast."""
        for module in self.modules():
            module.float()
            for p in module.parameters():
                p.requires_grad_(False)
        for buffer in CENTERS.values():
            if hasattr(self.model, buffer):
                setattr(self.model, buffer, getattr(self.model, buffer).float())

    # --- forward ---------------------------------------------------------------------------
    @staticmethod
    def _autocast(dtype: torch.dtype, device: torch.device):
        """Run float32 teacher weights in the compute dtype (no-op when that is float32)."""
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def embed(self, embedding: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The teacher's patch embedding of `images`, in the pipeline dtype."""
        with torch.no_grad(), self._autocast(dtype, images.device):
            return embedding(images).to(dtype)

    def encode(self, block: torch.nn.Module, x: torch.Tensor, pre_process: bool) -> torch.Tensor:
        """The teacher's transformer layers of this part on `x` [s, b, h], without gradient,
        returned in x's dtype (the packed pipeline tensor has one dtype)."""
        if not pre_process:
            block.set_input_tensor(x)
        with torch.no_grad(), self._autocast(x.dtype, x.device):
            return block(x, attention_mask=None).to(x.dtype)

    def observe(self, fields: dict[str, torch.Tensor]) -> None:
        """Add this micro-batch's teacher outputs to the step's centre statistics."""
        for field in CENTERS:
            if field in fields:
                rows = fields[field].detach().reshape(-1, fields[field].shape[-1]).float()
                total = self._sums.get(field)
                self._sums[field] = rows.sum(0) if total is None else total + rows.sum(0)
                self._counts[field] = self._counts.get(field, 0) + rows.shape[0]

    # --- after the optimizer step ------------------------------------------------------------
    @torch.no_grad()
    def start(self) -> None:
        """Copy the student into the teacher (SigLIP 2: the teacher starts as the student)."""
        for _, teacher, student in self.pairs():
            teacher.copy_(student)
        self.discard_step()

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, on this rank's shards."""
        pairs = self.pairs()
        if not pairs:
            return
        teachers = [t for _, t, _ in pairs]
        torch._foreach_mul_(teachers, momentum)
        torch._foreach_add_(teachers, [s.float() for _, _, s in pairs], alpha=1.0 - momentum)

    @torch.no_grad()
    def update_centers(self, momentum: float, group: Optional[dist.ProcessGroup]) -> None:
        """c <- momentum * c + (1 - momentum) * mean of the step's teacher outputs over the
        whole global batch (every micro-batch and data-parallel rank), as DINO does. Called by
        every last-stage rank of the data-parallel group (a collective)."""
        for field, buffer in CENTERS.items():
            if field not in self._sums:
                continue
            center = getattr(self.model, buffer)
            stats = torch.cat([self._sums[field], center.new_tensor([float(self._counts[field])])])
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(stats, group=group)
            center.mul_(momentum).add_(stats[:-1] / stats[-1], alpha=1.0 - momentum)
        self.discard_step()

    def discard_step(self) -> None:
        """Forget the step's centre statistics (after an update, or a skipped step)."""
        self._sums.clear()
        self._counts.clear()
