"""The pieces of SigLIP 2's self-distillation, each against a reference written here: DINO's
loss, the EMA and centre updates, the cosine momentum schedule, the masked patch embedding,
the DINO head, and the recipe checks."""

from __future__ import annotations

import math

import pytest
import torch

from tulip_mega.config import ConfigError, load_config
from tulip_mega.losses.distill import distill_chance_loss, distill_cross_entropy
from tulip_mega.models.decoders import DistillHead
from tulip_mega.models.teacher import TeacherState, teacher_momentum

DEBUG = ["model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8"]


def test_cross_entropy_matches_a_loop_over_rows_and_trains_only_the_student():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 4, 10, generator=g, requires_grad=True)  # 3 local crops, 4 samples
    teacher = torch.randn(4, 10, generator=g, requires_grad=True)
    center = torch.randn(10, generator=g)
    loss = distill_cross_entropy(student, teacher, center, 0.1, 0.04)
    rows = []
    for v in range(3):
        for i in range(4):
            t = [math.exp((teacher[i, k].item() - center[k].item()) / 0.04) for k in range(10)]
            z = sum(t)
            s = [student[v, i, k].item() / 0.1 for k in range(10)]
            lse = math.log(sum(math.exp(x) for x in s))
            rows.append(-sum(t[k] / z * (s[k] - lse) for k in range(10)))
    assert loss.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_chance_is_log_k_for_a_uniform_student():
    teacher = torch.randn(5, 32)
    uniform = torch.zeros(2, 5, 32)
    loss = distill_cross_entropy(uniform, teacher, torch.zeros(32), 0.1, 0.04)
    assert loss.item() == pytest.approx(distill_chance_loss(32), rel=1e-6) == pytest.approx(math.log(32))


def test_momentum_follows_dinos_cosine():
    assert teacher_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert teacher_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    k = 30
    assert teacher_momentum(k, 100, 0.9, 0.99) == pytest.approx(0.99 - 0.09 * (math.cos(math.pi * 0.3) + 1) / 2)


class _Part(torch.nn.Module):
    """A model part with one student module, its teacher copy and a centre."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 2)
        self.teacher_head = torch.nn.Linear(3, 2)
        self.register_buffer("distill_center", torch.zeros(2))
        self.teacher = TeacherState(self)


def test_ema_and_centre_updates_are_the_formulas():
    torch.manual_seed(0)
    part = _Part()
    part.head.to(torch.bfloat16)
    part.teacher.freeze_and_keep_fp32()
    assert part.teacher_head.weight.dtype == torch.float32 and not part.teacher_head.weight.requires_grad
    part.teacher.start()
    assert torch.equal(part.teacher_head.weight, part.head.weight.float())
    before = part.teacher_head.weight.clone()
    with torch.no_grad():
        part.head.weight.add_(1.0)
    part.teacher.update(0.99)
    expected = 0.99 * before + 0.01 * part.head.weight.float()
    torch.testing.assert_close(part.teacher_head.weight, expected, rtol=1e-6, atol=1e-7)  # fused multiply-add
    # An update far below bf16's resolution still moves the float32 teacher.
    with torch.no_grad():
        part.teacher_head.weight.fill_(1.0)
        part.head.weight.fill_(1.0078125)  # the next bf16 value after 1
    part.teacher.update(0.996)
    assert part.teacher_head.weight[0, 0].item() == pytest.approx(1.0 + 0.004 * 0.0078125, abs=1e-7)
    assert torch.tensor(part.teacher_head.weight[0, 0].item()).to(torch.bfloat16).item() == 1.0
    # Centre: two micro-batches of teacher outputs, mean over all rows.
    a, b = torch.randn(4, 2), torch.randn(6, 2)
    part.teacher.observe({"distill_teacher": a})
    part.teacher.observe({"distill_teacher": b})
    part.teacher.update_centers(0.9, None)
    torch.testing.assert_close(part.distill_center, 0.1 * torch.cat([a, b]).mean(0))
    part.teacher.update_centers(0.9, None)  # no statistics this step: unchanged
    torch.testing.assert_close(part.distill_center, 0.1 * torch.cat([a, b]).mean(0))


def test_masked_patch_embedding_puts_the_token_before_the_position():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tulip_mega.models.vision import PatchEmbedding

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    emb = PatchEmbedding(cfg, image_size=16, patch_size=8)
    torch.nn.init.normal_(emb.position_embedding)
    images = torch.randn(2, 3, 16, 16)
    token = torch.randn(8)
    masked = torch.tensor([[0, 3], [1, 2]])
    plain, out = emb(images), emb(images, mask=(masked, token))
    pos = emb.position_embedding
    for i in range(2):
        for j in range(4):
            expected = token + pos[j] if j in masked[i].tolist() else plain[j, i]
            torch.testing.assert_close(out[j, i], expected)


def test_dino_head_normalises_its_prototypes():
    head = DistillHead(8, 16, 4, 10)
    with torch.no_grad():
        head.prototypes.weight.mul_(7.0)
    x = torch.randn(5, 8)
    logits = head(x)
    assert logits.shape == (5, 10) and logits.abs().max() <= 1.0 + 1e-6  # cosines of unit vectors


@pytest.mark.parametrize("overrides,message", [
    (["loss.weights.self_distill=1"], "data.views.global_crops >= 2"),
    (["loss.weights.self_distill=1", "data.views.global_crops=2"], "data.views.local_crops >= 1"),
    (["loss.weights.masked_prediction=1"], "masks the second global crop"),
    (["loss.distill.start_fraction=1"], r"loss.distill.start_fraction=1.* must be in \[0, 1\)"),
    (["loss.distill.mask_ratio=0"], "loss.distill.mask_ratio"),
])
def test_recipe_checks_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, DEBUG + overrides)
