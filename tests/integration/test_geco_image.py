"""GeCo image stage (tulip_mega/datagen/geco/image.py): instructions, edit checks, a tiny diffusers
InstructPix2Pix pipeline end to end into the loader and the trainer, drops, kill and resume.

The pipeline is built here with random weights (a 2-block UNet with 8 input channels, a 2-block
VAE, a 2-layer CLIP text encoder and a byte-level CLIP tokenizer), saved to disk and loaded by
the command exactly as a real one would be. References are independent of the code under test:
instructions are written out by hand and shards are read back with shards.iter_samples and PIL.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import sys
import textwrap

import numpy as np
import pytest
from harness import kill_mid_second_shard, read_all
from PIL import Image

from tulip_mega.datagen.geco.image import (
    POSITIVE_INSTRUCTIONS,
    ImageEditSettings,
    check_edit,
    edit_instruction,
    edit_size,
    negative_for,
)
from tulip_mega.data.shards import expand_shards, iter_samples
from tulip_mega.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--steps", "2", "--resolution", "64", "--pos-max-change", "1", "--neg-min-change", "0", "--no-progress"]


def build_tiny_pix2pix(path: str) -> None:
    """Save a randomly initialised StableDiffusionInstructPix2PixPipeline (~100k weights) to ``path``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(path)


@pytest.fixture(scope="module")
def pix2pix(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("pix2pix") / "pipe")
    build_tiny_pix2pix(path)
    return path


def pixels(jpg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- instructions / checks


@pytest.mark.parametrize("rewrite,instruction", [
    ("a green circle on a blue background", "turn the red circle into a green circle"),  # attribute
    ("a red square on a blue background", "turn the red circle into a red square"),  # object
    ("three red circles on a blue background", "turn the red circle into three red circles"),  # count
    ("a red circle on a blue background with a dog", "add a dog"),
    ("a circle on a blue background", "turn the red circle into a circle"),
    ("a red circle under a blue background", "make it show a red circle under a blue background"),  # relation
    ("two cats asleep on a sofa in warm sun", "make it show two cats asleep on a sofa in warm sun"),  # rewrite
    ("A red circle on a blue background.", None),  # same words
])
def test_edit_instruction_names_the_change(rewrite, instruction) -> None:
    assert edit_instruction("a red circle on a blue background", rewrite) == instruction


def test_edit_instruction_keeps_nouns_whole() -> None:
    assert edit_instruction("a man riding a horse", "a woman riding a horse") == "turn the man into a woman"
    assert edit_instruction("two dogs under a wooden table", "two dogs under a metal table") == \
        "turn the wooden table into a metal table"


def test_negative_prefers_drawable_text_negatives_then_rules_then_any() -> None:
    caption = "a red circle on a blue background"
    meta = {"negatives": ["a red circle under a blue background", "a red star on a blue background"],
            "negative_kinds": ["relation", "object"]}
    for seed in range(5):  # the one drawable text negative, whatever the draw
        assert negative_for(caption, meta, random.Random(seed)) == \
            ("a red star on a blue background", "object", "geco_text")
    relation_only = {"negatives": ["a red circle under a blue background"], "negative_kinds": ["relation"]}
    rewrite, kind, source = negative_for(caption, relation_only, random.Random(0))
    assert source == "rules" and kind in ("object", "attribute", "count") and rewrite != caption
    # no rule applies to these words: the relation negative is the last resort; nothing: None
    assert negative_for("hello over there", {"negatives": ["hello under there"], "negative_kinds": ["relation"]},
                        random.Random(0)) == ("hello under there", "relation", "geco_text")
    assert negative_for("hello there", {"negatives": ["Hello there."]}, random.Random(0)) is None


def test_check_edit_rejects_blank_nonfinite_unchanged_and_too_different() -> None:
    s = ImageEditSettings(neg_min_change=0.02, pos_max_change=0.35)
    rng = np.random.default_rng(0)
    src = rng.uniform(0.1, 0.3, (64, 64, 3)).astype(np.float32)  # 1 - src differs by 0.6 on average
    slight = np.clip(src + 0.05, 0, 1)
    assert check_edit(src, slight, "pos", s) is None and check_edit(src, slight, "neg", s) is None
    assert check_edit(src, src + 0.005, "neg", s) == "unchanged"
    assert check_edit(src, src + 0.005, "pos", s) is None  # a faithful positive is fine
    assert check_edit(src, 1.0 - src, "pos", s) == "too_different"
    assert check_edit(src, 1.0 - src, "neg", s) is None
    assert check_edit(src, np.zeros_like(src), "neg", s) == "blank"  # a safety checker's black image
    bad = slight.copy()
    bad[0, 0, 0] = math.nan
    assert check_edit(src, bad, "neg", s) == "non_finite"
    assert check_edit(src, slight[:32], "neg", s) == "wrong_size"
    assert edit_size(16, 16, 64) == (64, 64) and edit_size(640, 480, 512) == (704, 512)
    with pytest.raises(ValueError, match="views"):
        ImageEditSettings(views=("left",))


# --------------------------------------------------------------------------- tiny pipeline end to end


def test_cli_end_to_end_edits_reach_the_loader(pix2pix, small_shards, shapes_data, tmp_path, capsys) -> None:
    before = read_all(small_shards)
    out = tmp_path / "out"
    args = ["geco", "image", "--model", pix2pix, "--in", small_shards, "--out", str(out), "--seed", "3",
            "--batch-size", "4", "--gen-batch", "3", *FAST]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 3 and summary["samples"] == 18
    assert summary["pos_images"] == 18 and summary["neg_images"] == 18 and summary["dropped"] == {}
    after = read_all(str(out))
    assert sorted(after) == sorted(before)
    for key, new in after.items():
        old = before[key]
        assert [e for e in new if not e.startswith("__")] == [e for e in old if not e.startswith("__")]
        assert new["jpg"] == old["jpg"] and new["txt"] == old["txt"]
        for view in ("pos.jpg", "neg.jpg"):
            assert new[view] != old[view], (key, view)  # replaced by the editor's output
            assert pixels(new[view]).shape == pixels(old["jpg"]).shape  # back at the input's size
        meta, old_meta = json.loads(new["json"]), json.loads(old["json"])
        record = meta.pop("geco_image")
        assert meta == old_meta  # everything else in key.json is kept
        assert record["method"] == "diffusion" and record["model"] == pix2pix and record["seed"] == 3
        assert record["pipeline"] == "StableDiffusionInstructPix2PixPipeline" and record["steps"] == 2
        assert record["pos_instruction"] in POSITIVE_INSTRUCTIONS
        caption = old["txt"].decode()
        assert record["neg_instruction"] == edit_instruction(caption, record["neg_caption"])
        assert record["neg_caption"].lower() != caption.lower()
        if record["neg_source"] == "geco_text":
            assert record["neg_caption"] in old_meta["negatives"]

    # same seed and batching -> byte-identical shards; other batching -> the same edits (each
    # job has its own noise), up to float rounding of batched kernels
    out2, out3 = tmp_path / "out2", tmp_path / "out3"
    assert cli_main([str(out2) if a == str(out) else a for a in args]) == 0
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
    rebatched = [str(out3) if a == str(out) else a for a in args]
    rebatched[rebatched.index("--gen-batch") + 1] = "5"
    assert cli_main(rebatched) == 0
    for key, s in read_all(str(out3)).items():
        assert s["json"] == after[key]["json"]
        for view in ("pos.jpg", "neg.jpg"):
            diff = np.abs(pixels(s[view]) - pixels(after[key][view]))  # float rounding, then JPEG's 8x8 blocks
            assert diff.mean() <= 1 / 255 and diff.max() <= 16 / 255, (key, view)
    capsys.readouterr()
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 3

    # the loader serves exactly these edits (16 px = the view size: a plain decode, in [-1, 1])
    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan
    from tulip_mega.data.tokenizer import Tokenizer

    plan = ViewPlan(image_size=16, edits=True)
    loader = DaliLoader(str(out), 6, plan, Tokenizer(shapes_data["tokenizer"], 24), gpu=False, shuffle_buffer=1,
                        num_epochs=1, threads=1)
    batch = next(iter(loader))
    assert batch.edit_valid.all()
    for b, key in enumerate(batch.keys):
        for v, view in enumerate(("pos.jpg", "neg.jpg")):
            want = pixels(after[key][view]) * 2.0 - 1.0
            got = batch.edits[b, v].permute(1, 2, 0).numpy()
            assert np.abs(got - want).mean() < 0.03, (key, view)


def test_rejected_edits_are_removed_recorded_and_absent_in_the_loader(pix2pix, small_shards, shapes_data,
                                                                     tmp_path, capsys) -> None:
    """Every negative rejected as unchanged (threshold 1.0): the input's old neg.jpg must not
    survive (it came from another generator), key.json says why, the loader sees no negative."""
    out = tmp_path / "out"
    args = ["geco", "image", "--model", pix2pix, "--in", small_shards, "--out", str(out), *FAST,
            "--neg-min-change", "1.0"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dropped"] == {"neg_unchanged": 18} and summary["pos_images"] == 18
    assert "neg_images" not in summary
    after = read_all(str(out))
    for key, s in after.items():
        assert "neg.jpg" not in s and "pos.jpg" in s, key
        record = json.loads(s["json"])["geco_image"]
        assert record["neg_dropped"] == "unchanged" and record["neg_instruction"]

    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan
    from tulip_mega.data.tokenizer import Tokenizer

    batch = next(iter(DaliLoader(str(out), 6, ViewPlan(image_size=16, edits=True),
                                 Tokenizer(shapes_data["tokenizer"], 24), gpu=False, shuffle_buffer=1,
                                 num_epochs=1, threads=1)))
    assert batch.edit_valid[:, 0].all() and not batch.edit_valid[:, 1].any()
    assert (batch.edits[:, 1] == 0).all()

    # only the positive asked for: the input's neg.jpg is kept as it was
    before = read_all(small_shards)
    only_pos = tmp_path / "pos"
    assert cli_main(["geco", "image", "--model", pix2pix, "--in", small_shards, "--out", str(only_pos),
                     "--views", "pos", *FAST]) == 0
    for key, s in read_all(str(only_pos)).items():
        assert s["neg.jpg"] == before[key]["neg.jpg"] and s["pos.jpg"] != before[key]["pos.jpg"]
        assert "neg_instruction" not in json.loads(s["json"])["geco_image"]


def test_training_reads_geco_image_output(pix2pix, small_shards, shapes_data, tmp_path) -> None:
    """geco text (rules) then geco image, then 2 steps of the full TULIP stack on the result."""
    from test_stack import _train_worker
    from tulip_mega.parallel.spawn import run_distributed
    from tulip_mega.training.metrics import read_metrics

    text, image = str(tmp_path / "text"), str(tmp_path / "image")
    assert cli_main(["geco", "text", "--model", "eda", "--in", small_shards, "--out", text, "--no-progress"]) == 0
    assert cli_main(["geco", "image", "--model", pix2pix, "--in", text, "--out", image, *FAST]) == 0
    overrides = [f"data.train_shards={image}", f"data.tokenizer={shapes_data['tokenizer']}",
                 f"run.output_dir={tmp_path}", "run.name=geco", "train.steps=2", "optim.warmup_steps=1", "train.global_batch_size=8",
                 "train.micro_batch_size=4", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                 "logging.tensorboard=false", "checkpoint.interval=0", "eval.interval=0"]
    run_distributed(_train_worker, 1, os.path.join(REPO, "recipes", "tiny_tulip_cpu.yaml"), overrides)
    metrics = read_metrics(tmp_path / "geco" / "metrics.jsonl")
    assert len(metrics) == 2
    for m in metrics:
        for term in ("image_image", "text_text", "image_text"):
            assert math.isfinite(m[f"loss/{term}"]) and m[f"loss/{term}"] > 0, (term, m)
        assert m.get("data/skipped", 0) == 0


# --------------------------------------------------------------------------- errors


def test_missing_or_wrong_model_is_a_clear_error(pix2pix, small_shards, tmp_path, capsys) -> None:
    missing = str(tmp_path / "no-such-pipeline")
    assert cli_main(["geco", "image", "--model", missing, "--in", small_shards, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no-such-pipeline" in err and "nothing is downloaded" in err and "model_index.json" in err
    assert not os.path.exists(tmp_path / "o")  # nothing written before the model loads

    # a diffusers pipeline that is not an editor (no input image)
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    ddpm = str(tmp_path / "ddpm")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(ddpm)
    assert cli_main(["geco", "image", "--model", ddpm, "--in", small_shards, "--out", str(tmp_path / "o")]) == 2
    assert "DDPMPipeline" in capsys.readouterr().err

    assert cli_main(["geco", "image", "--model", pix2pix, "--in", small_shards, "--out", str(tmp_path / "o"),
                     "--views", "pos,left"]) == 2
    assert "views" in capsys.readouterr().err
    assert cli_main(["geco", "image", "--model", pix2pix, "--in", small_shards, "--out", str(tmp_path / "o"),
                     "--dtype", "float65"]) == 2
    assert "--dtype 'float65' is not a torch dtype" in capsys.readouterr().err
    assert cli_main(["geco", "image", "--model", pix2pix, "--in", str(tmp_path / "none-*.tar"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "matched no files" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


# --------------------------------------------------------------------------- kill and resume

_SLOW_RUN = textwrap.dedent("""
    import sys, time
    from tulip_mega.datagen.geco.image import DiffusersImageEditor, ImageEditSettings, ImageStage
    from tulip_mega.datagen.geco.run import run_geco

    class Slow(DiffusersImageEditor):
        def edit(self, jobs):
            time.sleep(0.3)
            return super().edit(jobs)

    settings = ImageEditSettings(steps=2, resolution=64, pos_max_change=1.0, neg_min_change=0.0)
    stage = ImageStage(Slow(sys.argv[1], settings))
    run_geco(sys.argv[2], sys.argv[3], stage, seed=5, batch_size=2, progress=False)
""")


def test_kill_mid_run_then_rerun_loses_and_duplicates_nothing(pix2pix, small_shards, tmp_path) -> None:
    from tulip_mega.datagen.geco.image import DiffusersImageEditor, ImageStage
    from tulip_mega.datagen.geco.run import run_geco

    out = tmp_path / "out"
    names = [os.path.basename(s) for s in expand_shards(small_shards)]
    kill_mid_second_shard([sys.executable, "-c", _SLOW_RUN, pix2pix, small_shards, str(out)], out, names, 120)
    first = (out / names[0]).read_bytes()

    settings = ImageEditSettings(steps=2, resolution=64, pos_max_change=1.0, neg_min_change=0.0)
    stage = ImageStage(DiffusersImageEditor(pix2pix, settings))
    summary = run_geco(small_shards, str(out), stage, seed=5, batch_size=2, progress=False)
    assert summary.skipped == [str(out / names[0])] and len(summary.written) == 2
    assert (out / names[0]).read_bytes() == first
    assert sorted(os.listdir(out)) == sorted(names)  # no .partial left behind
    for name, src in zip(names, expand_shards(small_shards)):
        assert [s["__key__"] for s in iter_samples(str(out / name))] == [s["__key__"] for s in iter_samples(src)]
    # identical to an uninterrupted run in this process (the killed one wrote shard 0)
    clean = tmp_path / "clean"
    run_geco(small_shards, str(clean), stage, seed=5, batch_size=2, progress=False)
    for name in names:
        assert (clean / name).read_bytes() == (out / name).read_bytes(), name
