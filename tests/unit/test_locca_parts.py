"""The LocCa targets and loss (losses/locca.py), each against a reference written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tulip_mega.config import ConfigError, load_config
from tulip_mega.data.base import Batch
from tulip_mega.losses.locca import LoccaVocab, build_targets, decoder_length, locca_loss

PAD, EOS = 0, 1
DEBUG = ["model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8"]


def _batch() -> Batch:
    tokens = torch.tensor([[5, 6, EOS, PAD, PAD, PAD], [7, EOS, PAD, PAD, PAD, PAD]])
    regions = torch.tensor([[[8, 9, EOS, PAD, PAD, PAD], [PAD] * 6], [[PAD] * 6, [PAD] * 6]])
    boxes = torch.tensor([[[0.0, 0.25, 0.5, 1.0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, False], [False, False]])
    return Batch(images=torch.zeros(2, 3, 8, 8), tokens=tokens, keys=["a", "b"], region_tokens=regions,
                 region_boxes=boxes, region_valid=valid)


def test_vocabulary_locations_tasks_and_padding():
    v = LoccaVocab(text=100, bins=10, tensor_parallel=4)
    assert v.location(torch.tensor([0.0, 0.05, 0.999, 1.0])).tolist() == [100, 100, 109, 109]
    assert [v.task(t) for t in ("cap", "aref", "gcap")] == [110, 111, 112] and v.mask == 113
    assert v.size == 116  # 114 ids rounded up to a multiple of TP
    assert v.box(torch.tensor([100, 109])).tolist() == pytest.approx([0.05, 0.95])
    assert decoder_length(6) == 10 and decoder_length(6, 4) == 12


def test_sequences_are_laid_out_as_documented():
    v = LoccaVocab(text=100, bins=10)
    t = build_targets(_batch(), ["a", "b"], step=0, seed=0, vocab=v, length=10, parallel_fraction=0.0, pad_id=PAD)
    cap_a, cap_b, aref_a, aref_b, gcap_a, gcap_b = range(6)
    assert t.inputs[cap_a].tolist() == [110, 5, 6] + [PAD] * 7
    assert t.targets[cap_a].tolist() == [5, 6, EOS] + [PAD] * 7
    assert t.weights[cap_a].tolist() == [1, 1, 1] + [0] * 7
    box = [100, 102, 105, 109]  # (0, 0.25, 0.5, 1.0) in 10 bins
    assert t.inputs[aref_a].tolist() == [111, 8, 9, EOS] + box[:3] + [PAD] * 3
    assert t.targets[aref_a].tolist() == [8, 9, EOS] + box + [PAD] * 3
    assert t.weights[aref_a].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert t.inputs[gcap_a].tolist() == [112] + box + [8, 9] + [PAD] * 3
    assert t.weights[gcap_a].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert t.targets[gcap_a].tolist()[4:7] == [8, 9, EOS]
    for row in (aref_b, gcap_b):  # sample b has no region: nothing to predict
        assert t.weights[row].sum() == 0
    assert t.weights[cap_b].tolist()[:2] == [1, 1]


def test_parallel_prediction_masks_every_teacher_forced_input():
    v = LoccaVocab(text=100, bins=10)
    t = build_targets(_batch(), ["a", "b"], step=0, seed=0, vocab=v, length=10, parallel_fraction=1.0, pad_id=PAD)
    assert t.inputs[0].tolist() == [110, v.mask, v.mask] + [PAD] * 7
    assert t.targets[0].tolist()[:3] == [5, 6, EOS]
    draws = [build_targets(_batch(), ["a", "b"], s, 0, v, 10, 0.5, PAD).inputs[0, 1].item() == v.mask
             for s in range(200)]
    assert 0.35 < sum(draws) / len(draws) < 0.65  # about the configured share, varying with the step


def test_loss_is_the_per_sample_sum_of_task_means():
    g = torch.Generator().manual_seed(0)
    v = LoccaVocab(text=100, bins=10)
    t = build_targets(_batch(), ["a", "b"], 0, 0, v, 10, 0.0, PAD)
    logits = torch.randn(10, 6, v.size, generator=g)
    got = locca_loss(logits.clone(), t.targets, t.weights)
    per_seq = []
    for r in range(6):
        ces = [F.cross_entropy(logits[j, r], t.targets[r, j]).item() for j in range(10) if t.weights[r, j] > 0]
        per_seq.append(sum(ces) / len(ces) if ces else 0.0)
    expected = ((per_seq[0] + per_seq[2] + per_seq[4]) + (per_seq[1] + per_seq[3] + per_seq[5])) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(got.item())


def test_locca_refuses_a_cropped_first_view():
    with pytest.raises(ConfigError, match="first_view_crop=false"):
        load_config(None, DEBUG + ["loss.weights.locca=1", "data.augment.first_view_crop=true"])


def _locca_params_worker(overrides: list[str]) -> int:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from harness import build_train_step

    _, model, *_ = build_train_step(overrides)
    return sum(p.numel() for n, p in model[0].module.named_parameters() if n.startswith("locca_decoder."))


def test_plan_counts_the_built_decoders_parameters_and_flops():
    from tulip_mega.config.streams import input_streams
    from tulip_mega.flops import count_flops
    from tulip_mega.parallel.spawn import run_distributed
    from tulip_mega.plan_stages import locca_params

    overrides = ["train.global_batch_size=8", "train.micro_batch_size=4", "loss.weights.locca=1",
                 "loss.locca.box_bins=32", "model.locca_decoder.num_layers=2"]
    cfg = load_config(None, DEBUG + overrides)
    built = run_distributed(_locca_params_worker, 1, DEBUG + overrides, timeout=300)[0]
    assert sum(locca_params(cfg)) == built
    # FLOPs by hand: debug text width 64 (ffn 256), 16 patches of width 64, context 64 + 4 positions.
    d, f, P, L, V, layers = 64, 256, 16, 68, 1024 + 32 + 4, 2
    self_mm = 2 * L * d * 3 * d + 2 * L * d * d + 4 * L * d * f
    cross_mm = 2 * L * d * d + 4 * P * d * d + 2 * L * d * d
    parts = count_flops(cfg, input_streams(cfg)).parts
    assert parts["locca_decoder_matmul"] == 2 * P * d * d + 3 * layers * (self_mm + cross_mm) + 3 * 2 * L * d * V
    assert parts["locca_decoder_attention"] == 3 * layers * (4 * L * L * d + 4 * L * P * d)


def test_chance_is_log_vocabulary_per_task_present():
    from tulip_mega.config.streams import input_streams
    from tulip_mega.losses.outputs import ModelOutputs
    from tulip_mega.losses.stack import TulipLossStack

    cfg = load_config(None, DEBUG + ["loss.weights.locca=1"])
    stack = TulipLossStack(cfg, input_streams(cfg), group=None, pad_id=PAD)
    one = torch.tensor(1.0)
    out = ModelOutputs(image_emb=torch.zeros(2, 4), text_emb=torch.zeros(2, 4), logit_scale=one, logit_bias=one,
                       ii_logit_scale=one, ii_logit_bias=one, tt_logit_scale=one, tt_logit_bias=one,
                       locca_logits=torch.zeros(10, 6, 1060))
    chance = stack.chance(out, _batch(), ["locca"])["locca"].item()
    assert chance == pytest.approx((1 + 2 * 0.5) * math.log(1060), rel=1e-6)  # one of two samples has a region
    # and it is what a uniform decoder scores
    v = LoccaVocab(text=1024, bins=32)
    t = build_targets(_batch(), ["a", "b"], 0, 0, v, 10, 0.0, PAD)
    uniform = locca_loss(torch.zeros(10, 6, 1060), t.targets, t.weights).item()
    assert uniform == pytest.approx(chance, rel=1e-6)
