"""Model FLOPs per sample against hand counts, and the throughput helpers (peaks, MFU, stragglers).

The hand counts below write out every matmul of a tiny config with all towers, views,
decoders and heads switched on, independently of tulip_mega.flops.
"""

from __future__ import annotations

import pytest

from tulip_mega.config import load_config
from tulip_mega.config.streams import input_streams
from tulip_mega.plan import forward_flops_per_sample, make_plan
from tulip_mega.flops import count_flops, tokens_per_sample
from tulip_mega.training.throughput import (
    StragglerDetector,
    TimedIterator,
    achieved_tflops,
    mfu,
    peak_tflops,
)

DEBUG = ["model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
         "model.text.context_length=16"]  # the hand counts below assume 16 text tokens = 16 patches


def _layer(s: int, h: int, f: int) -> int:
    """One transformer layer, every matmul: Q, K, V, scores, AV, out proj, fc1, fc2."""
    q = k = v = 2 * s * h * h
    scores = 2 * s * s * h
    av = 2 * s * s * h
    out = 2 * s * h * h
    fc1 = fc2 = 2 * s * h * f
    return q + k + v + scores + av + out + fc1 + fc2


def _map_head(s: int, h: int, f: int) -> int:
    q = 2 * 1 * h * h
    k = v = 2 * s * h * h
    scores = av = 2 * 1 * s * h
    out = 2 * 1 * h * h
    fc1 = fc2 = 2 * 1 * h * f
    return q + k + v + scores + av + out + fc1 + fc2


def test_siglip_only_matches_hand_count():
    cfg = load_config(None, DEBUG)
    # debug: both towers 2 layers, h=64, f=256; vision 32px/8 -> 16 patches; text 16 tokens; e=64.
    hand = (2 * _layer(16, 64, 256)  # vision layers
            + 2 * 16 * (3 * 8 * 8) * 64  # patch conv on 16 patches
            + _map_head(16, 64, 256)
            + 2 * _layer(16, 64, 256)  # text layers
            + 2 * 64 * 64)  # text head on the last token
    count = count_flops(cfg, input_streams(cfg))
    assert count.forward == hand == 7_303_168
    assert count.training == 3 * hand
    # plan uses the same numbers (and leaves the contrastive logits out).
    assert sum(forward_flops_per_sample(cfg, input_streams(cfg)).values()) == hand
    assert make_plan(cfg, nodes=1, gpus_per_node=1).flops_model_per_sample == 3 * hand
    # The logits: image-text only, contrastive batch 8 x DP 2 columns.
    assert count_flops(cfg, input_streams(cfg), contrastive_batch=16).forward == hand + 2 * 64 * 16
    assert tokens_per_sample(cfg, input_streams(cfg)) == 16 + 16


def test_every_tower_view_and_decoder_matches_hand_count():
    cfg = load_config(None, DEBUG + [
        "loss.weights.image_image=1", "loss.weights.text_text=1", "loss.weights.mae=1",
        "loss.weights.text_recon=1", "loss.weights.aug_contrastive=1",
        "data.views.global_crops=2", "data.views.local_crops=2", "data.views.local_size=16",
        "data.views.geco_images=true", "data.views.paraphrases=2", "data.views.negatives=1", "data.views.eda=true",
        "loss.mae_mask_ratio=0.75",
        "model.mae_decoder.num_layers=1", "model.mae_decoder.hidden_size=32", "model.mae_decoder.num_heads=2",
        "model.mae_decoder.ffn_hidden_size=64",
        "model.text_decoder.num_layers=1", "model.text_decoder.hidden_size=48", "model.text_decoder.num_heads=2",
        "model.text_decoder.ffn_hidden_size=96",
        "model.aug_projector_hidden=128",
        "model.text.vocab_size=512",
    ])
    h, f, p, e = 64, 256, 8, 64
    conv = 2 * 3 * p * p * h  # per embedded patch
    # global stream: view 0 + 1 extra crop + 2 GeCo edits = 4 views of 16 patches, MAP head each
    glob = 4 * (2 * _layer(16, h, f) + 16 * conv + _map_head(16, h, f))
    # local stream: 2 crops of 16px -> 2x2 = 4 patches each, MAP head each
    local = 2 * (2 * _layer(4, h, f) + 4 * conv + _map_head(4, h, f))
    # MAE stream: int(16 * 0.25) = 4 visible patches, conv on those only, no MAP head
    mae_enc = 2 * _layer(4, h, f) + 4 * conv
    # texts: caption + 2 paraphrases + 1 negative + EDA caption = 5, 16 tokens, head on last token
    texts = 5 * (2 * _layer(16, 64, 256) + 2 * 64 * e)
    # MAE decoder: embed 4 visible tokens 64->32, 1 layer (d=32, f=64) over all 16 patches,
    # predict 3*8*8 pixels for the 12 masked patches
    mae_dec = 2 * 4 * 64 * 32 + _layer(16, 32, 64) + 2 * 12 * 32 * (3 * p * p)
    # text decoder: condition token e->48, 1 layer (48, 96) over 16 tokens, vocab head over 16 tokens
    text_dec = 2 * 1 * e * 48 + _layer(16, 48, 96) + 2 * 16 * 48 * 512
    # aug projectors: image and text, each e->128->e on one vector
    aug = 2 * (2 * e * 128 + 2 * 128 * e)
    # logits: 4 contrastive terms (it, ii, tt, aug) x 2 e C with C = 8
    logits = 4 * 2 * e * 8
    hand = glob + local + mae_enc + texts + mae_dec + text_dec + aug + logits

    count = count_flops(cfg, input_streams(cfg), contrastive_batch=8)
    assert count.forward == hand
    parts = count.parts
    assert parts["mae_decoder_matmul"] + parts["mae_decoder_attention"] == mae_dec
    assert parts["text_decoder_matmul"] + parts["text_decoder_attention"] == text_dec
    assert parts["aug_projector"] == aug and parts["contrastive_logits"] == logits
    assert parts["vision_map_head"] == 4 * _map_head(16, h, f) + 2 * _map_head(4, h, f)
    assert parts["vision_patch_embed"] == (4 * 16 + 2 * 4 + 4) * conv
    assert tokens_per_sample(cfg, input_streams(cfg)) == 4 * 16 + 2 * 4 + 4 + 5 * 16
    # selective recompute in plan re-runs every attention-score product, decoders included
    attention = (4 * 2 * 4 * 16 * 16 * h + 2 * 2 * 4 * 4 * 4 * h + 2 * 4 * 4 * 4 * h + 5 * 2 * 4 * 16 * 16 * 64
                 + 4 * 16 * 16 * 32 + 4 * 16 * 16 * 48)
    assert count.attention == attention


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "fp8") == 2 * 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    with pytest.raises(ValueError, match="dtype"):
        peak_tflops("NVIDIA H100", "int4")
    # 1e9 FLOPs per sample, 8000 samples/s over 8 GPUs = 1 TFLOP/s each.
    assert achieved_tflops(1e9, 8000.0, 8) == pytest.approx(1.0)
    assert mfu(494.5, 989.0) == pytest.approx(0.5)
    assert mfu(1.0, None) is None


def test_straggler_detector_flags_only_far_slower_steps():
    det = StragglerDetector(factor=3.0, window=10, warmup=3)
    assert det.update(1, 50.0) is None  # warmup: even a huge first step is not flagged
    for step in range(2, 12):
        assert det.update(step, 1.0 + 0.01 * step) is None
    message = det.update(12, 5.0)
    assert message is not None and "slow step 12" in message and "x the running median" in message
    assert det.update(13, 2.5) is None  # 2.5x < 3x
    # the outlier did not enter the baseline: a second 5 s step is still flagged
    assert det.update(14, 5.0) is not None


def test_timed_iterator_measures_waiting():
    import time

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    it = TimedIterator(slow())
    assert [next(it), next(it)] == [0, 1]
    assert 0.09 <= it.pop_wait() < 0.5
    assert it.pop_wait() == 0.0
    assert list(it) == [2]
