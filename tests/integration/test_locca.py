"""SigLIP 2's LocCa term inside the real training step, and its data through the real loader.

- the term equals a reference computed here from view 0's patch tokens through the decoder
  and a plain cross entropy over the documented sequences (single process);
- TP=2 x PP=2 and TP=2 with sequence parallel give the single process's losses and gradients;
- the DALI loader reads the scenes set's regions (boxes and captions equal the json), a sample
  whose regions are malformed is skipped with a reason that names the field, and one without
  regions trains only the captioning task.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from harness import assert_same_step, build_train_step, global_batches, rank_microbatches, step_worker
from tulip_mega.parallel.spawn import run_distributed

LOCCA = ["train.global_batch_size=16", "train.micro_batch_size=4", "train.steps=3",
         "loss.weights.locca=1", "loss.locca.box_bins=32", "model.locca_decoder.num_layers=2"]


def reference_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.losses.locca import LoccaVocab, build_targets, decoder_length

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    m = step.modules[0]
    batch = global_batches(cfg, 1)[0]
    vocab = LoccaVocab(cfg.model.text.vocab_size, cfg.loss.locca.box_bins)
    length = decoder_length(cfg.model.text.context_length)
    per_sample = []
    with torch.no_grad():
        for lo in range(0, 16, 4):  # the step's micro-batches
            micro = batch.slice(lo, lo + 4)
            t = build_targets(micro, micro.keys, 0, cfg.run.seed, vocab, length, cfg.loss.locca.parallel_fraction, 0)
            patches = m.vision_block(m.vision_embed(micro.images), attention_mask=None)  # view 0, [P, b, h]
            logits = m.locca_decoder(patches, t.inputs)  # [Ld, 3b, V]
            for i in range(4):
                total = 0.0
                for task in range(3):
                    r = task * 4 + i
                    keep = t.weights[r] > 0
                    if keep.any():
                        total += F.cross_entropy(logits[keep, r], t.targets[r, keep]).item()
                per_sample.append(total)
    metrics = step.forward_backward(rank_microbatches(cfg, [batch], 0, 1))
    return {"reference": sum(per_sample) / len(per_sample), "metric": metrics["loss/locca"]}


@pytest.mark.multiprocess
def test_term_equals_a_reference_from_view_zero_tokens():
    out = run_distributed(reference_worker, 1, LOCCA)[0]
    assert out["metric"] == pytest.approx(out["reference"], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world,layout", [
    (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
])
def test_layouts_match_single_process(world, layout):
    ref = run_distributed(step_worker, 1, LOCCA, 2)
    out = run_distributed(step_worker, world, LOCCA + layout, 2)
    grads = assert_same_step(out, ref, loss_rtol=1e-5, grad_rtol=1e-4)
    decoder = [k for k in grads if k.startswith("locca_decoder.")]
    assert any("cross_attention" in k for k in decoder) and all(grads[k].abs().max() > 0 for k in decoder)


# --- data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from tulip_mega.datagen.synthetic_scenes import write_scenes_dataset

    out = tmp_path_factory.mktemp("scenes_locca")
    write_scenes_dataset(str(out), num_train=64, num_val=0, samples_per_shard=32, image_size=32, seed=5)
    return out


def test_loader_reads_regions_and_skips_malformed_ones(scenes, shapes_data, tmp_path, caplog):
    pytest.importorskip("nvidia.dali")
    import logging

    from test_dali import _plant

    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan
    from tulip_mega.data.shards import iter_samples
    from tulip_mega.data.tokenizer import Tokenizer

    src = str(scenes / "train-000000.tar")
    bad, none = "train0000003", "train0000007"

    def edit(s):
        meta = json.loads(s["json"])
        if s["__key__"] == bad:
            meta["regions"][0]["box"] = [0.5, 0.2, 0.4, 0.9]  # x0 > x1
        elif s["__key__"] == none:
            meta.pop("regions")  # optional: this sample trains captioning only
        s["json"] = json.dumps(meta).encode()
        return s

    planted = str(tmp_path / "a.tar")
    _plant(src, planted, edit)
    truth = {s["__key__"]: json.loads(s["json"]).get("regions", []) for s in iter_samples(planted)}
    caplog.set_level(logging.WARNING)
    tok = Tokenizer(shapes_data["tokenizer"], 16)
    dl = DaliLoader([planted], 8, ViewPlan(image_size=32, regions=4), tok, gpu=False, threads=2, num_epochs=1)
    batches = list(dl)
    keys = [k for b in batches for k in b.keys]
    assert bad not in keys and len(keys) == 31 and dl.stats()["skipped"] == 1
    assert any(bad in r.getMessage() and "regions[0].box" in r.getMessage() for r in caplog.records)
    for b in batches:
        assert b.region_tokens.shape == (len(b), 4, 16) and b.region_boxes.shape == (len(b), 4, 4)
        for i, key in enumerate(b.keys):
            regions = truth[key][:4]
            assert b.region_valid[i].tolist() == [j < len(regions) for j in range(4)]
            for j, region in enumerate(regions):
                torch.testing.assert_close(b.region_boxes[i, j], torch.tensor(region["box"]))
                assert b.region_tokens[i, j].tolist() == tok.encode([region["caption"]])[0].tolist()
    assert not any(b.region_valid[b.keys.index(none)].any() for b in batches if none in b.keys)


def test_box_iou_is_intersection_over_union():
    from tulip_mega.eval.locca import box_iou

    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    assert box_iou(a, b).tolist() == pytest.approx([0.0625 / (0.25 + 0.25 - 0.0625), 1.0, 0.0])


def _scenes_train_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train

    return train(load_config(None, overrides))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_scenes_eval_reports_referring_accuracy_for_a_locca_checkpoint(scenes, shapes_data, tmp_path):
    """Train 4 steps with the decoder on the scenes set (TP=2 on 2 ranks), then the scenes eval of
    the checkpoint (any layout, rebuilt in one process) scores every val region's greedy box."""
    pytest.importorskip("nvidia.dali")
    from tulip_mega.data.shards import iter_samples
    from tulip_mega.datagen.synthetic_scenes import write_scenes_dataset
    from tulip_mega.evaluate import evaluate_scenes_checkpoint

    data = tmp_path / "scenes"
    write_scenes_dataset(str(data), num_train=64, num_val=16, samples_per_shard=32, image_size=32, seed=7)
    overrides = [*LOCCA[:2], "model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
                 "model.text.context_length=16", "train.steps=4", "optim.warmup_steps=1", *LOCCA[3:],
                 f"data.train_shards={data}/train-*.tar", f"data.tokenizer={shapes_data['tokenizer']}",
                 "parallel.tensor_parallel=2", f"run.output_dir={tmp_path}", "run.name=locca",
                 "logging.tensorboard=false", "checkpoint.interval=4", "data.loader=dali"]
    out = run_distributed(_scenes_train_worker, 2, overrides)
    metrics = evaluate_scenes_checkpoint(out[0]["checkpoint"], str(data), tokenizer=shapes_data["tokenizer"])["metrics"]
    names = [[r["caption"] for r in json.loads(s["json"])["regions"]] for s in iter_samples(str(data / "val-000000.tar"))]
    regions = sum(sum(n.count(c) == 1 for c in n) for n in names)  # expressions that name one object
    assert metrics["locca/refer_regions"] == regions
    assert 0 <= metrics["locca/refer_acc50"] <= 1 and 0 <= metrics["locca/refer_iou"] <= 1
    assert 0 <= metrics["locca/refer_acc50_chance"] <= 1 and "zeroshot/count" in metrics
