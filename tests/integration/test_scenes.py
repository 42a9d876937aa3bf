"""The scenes benchmark: dataset determinism, one-attribute hard negatives, evaluation sanity,
and benchmarks/quality.py --quick end to end."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tulip_mega.data.shards import iter_samples
from tulip_mega.datagen.synthetic import FOREGROUNDS, SHAPES
from tulip_mega.datagen.synthetic_scenes import (
    ATTRIBUTES,
    COUNTS,
    RELATIONS,
    SIZES,
    alternatives,
    applicable,
    caption,
    changed_attribute,
    scenes_json,
    write_scenes_dataset,
)
from tulip_mega.eval.scenes import PROBES, captions_needed, probe_labels, probes, scene_metrics

ROOT = Path(__file__).resolve().parents[2]


def _all_scenes():
    for count, size, colour, shape in itertools.product(COUNTS, SIZES, FOREGROUNDS, SHAPES):
        yield {"kind": "count", "count": count, "size": size, "colour": colour, "shape": shape}
    for rel, (ca, cb), (sa, sb) in itertools.product(RELATIONS, itertools.permutations(FOREGROUNDS, 2),
                                                     itertools.permutations(SHAPES, 2)):
        yield {"kind": "relation", "relation": rel, "colour_a": ca, "shape_a": sa, "colour_b": cb, "shape_b": sb}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    write_scenes_dataset(str(out), num_train=192, num_val=96, samples_per_shard=64, image_size=32, seed=3)
    return out


def test_same_seed_writes_byte_identical_files(scenes, tmp_path):
    write_scenes_dataset(str(tmp_path), num_train=192, num_val=96, samples_per_shard=64, image_size=32, seed=3)
    names = sorted(os.listdir(scenes))
    assert names == sorted(os.listdir(tmp_path)) and "scenes.json" in names and "val-000001.tar" in names
    for name in names:
        assert (scenes / name).read_bytes() == (tmp_path / name).read_bytes(), name
    other = tmp_path / "other"
    write_scenes_dataset(str(other), num_train=192, num_val=96, samples_per_shard=64, image_size=32, seed=4)
    assert (other / "train-000000.tar").read_bytes() != (scenes / "train-000000.tar").read_bytes()


def test_every_hard_negative_changes_exactly_one_attribute(scenes):
    """Over the whole written set: negatives, the neg scenes they name, captions, and val pairs."""
    info = json.loads((scenes / "scenes.json").read_text())
    seen = set()
    samples = 0
    for shard in sorted(scenes.glob("*.tar")):
        for item in iter_samples(str(shard)):
            meta = json.loads(item["json"])
            scene, txt = meta["scene"], item["txt"].decode()
            split = "train" if item["__key__"].startswith("train") else "val"
            assert info[split][item["__key__"]] == scene
            assert txt == caption(scene, 0) or txt in {caption(scene, t) for t in (1, 2)}
            assert sorted(meta["paraphrases"] + [txt]) == sorted(caption(scene, t) for t in range(3))
            assert sorted(meta["negative_attributes"]) == sorted(applicable(scene))
            for neg_txt, attr, neg in zip(meta["negatives"], meta["negative_attributes"], meta["negative_scenes"],
                                          strict=True):
                assert changed_attribute(scene, neg) == attr, (scene, neg)
                assert neg_txt == caption(neg)
                assert neg_txt not in meta["paraphrases"] + [txt, caption(scene)]
                seen.add(attr)
            assert {"pos.jpg", "neg.jpg", "jpg"} <= set(item)
            samples += 1
    assert samples == 192 + 96
    assert seen == set(ATTRIBUTES)
    assert len(info["pairs"]) == 48
    for a, b, attr in info["pairs"]:
        assert changed_attribute(info["val"][a], info["val"][b]) == attr
        assert caption(info["val"][a]) != caption(info["val"][b])
    assert {attr for _, _, attr in info["pairs"]} == set(ATTRIBUTES)


def test_alternatives_differ_in_exactly_their_attribute_and_captions_are_unique():
    """Every scene of the vocabulary: distinct scenes have distinct canonical captions, and each
    alternative differs in exactly the attribute asked for."""
    every = list(_all_scenes())
    assert len({caption(s) for s in every}) == len(every)
    for scene in every:
        for attr in ATTRIBUTES:
            alts = alternatives(scene, attr)
            assert bool(alts) == (attr in applicable(scene))
            assert all(changed_attribute(scene, a) == attr for a in alts)
    assert changed_attribute(every[0], every[0]) is None
    assert changed_attribute(every[0], every[-1]) is None  # other kind


def _one_hot_features(info, split):
    """Image features that encode the scene's attributes linearly (a perfect vision model)."""
    vocab = [("kind", ("count", "relation")), ("count", COUNTS), ("size", SIZES), ("colour", FOREGROUNDS),
             ("shape", SHAPES), ("relation", RELATIONS)]
    out = {}
    for key, scene in info[split].items():
        parts = [F.one_hot(torch.tensor(values.index(scene[f])), len(values)).float() if f in scene
                 else torch.zeros(len(values)) for f, values in vocab]
        out[key] = F.normalize(torch.cat(parts), dim=0)
    return out


def test_evaluation_is_perfect_on_a_perfect_embedding():
    info = scenes_json(num_train=400, num_val=200, seed=0, image_size=32)
    caps = captions_needed(info)
    text = dict(zip(caps, torch.eye(len(caps))))
    val = {k: text[caption(s)] for k, s in info["val"].items()}
    metrics = scene_metrics(info, val, {}, text)
    scores = {k: v for k, v in metrics.items() if not k.endswith("_chance") and k != "pairs/pairs"}
    assert set(scores) >= {f"zeroshot/{a}" for a in ATTRIBUTES} | {f"pairs/{a}" for a in ATTRIBUTES} | {"pairs/all"}
    assert all(v == 1.0 for v in scores.values()), scores
    top1 = probes(info, _one_hot_features(info, "train"), _one_hot_features(info, "val"))
    assert all(top1[p] == 1.0 for p in PROBES), top1


def test_evaluation_is_at_chance_on_random_embeddings():
    info = scenes_json(num_train=1200, num_val=2000, seed=1, image_size=32)
    g = torch.Generator().manual_seed(0)

    def rand(keys):
        return dict(zip(keys, F.normalize(torch.randn(len(keys), 64, generator=g), dim=1)))

    caps = captions_needed(info)
    m = scene_metrics(info, rand(list(info["val"])), rand(list(info["train"])), rand(caps))
    for attr in ATTRIBUTES:  # ~1000 trials each: 4 sigma is < 0.065
        assert abs(m[f"zeroshot/{attr}"] - m[f"zeroshot/{attr}_chance"]) < 0.065, (attr, m)
    assert m["pairs/pairs"] == 1000 and abs(m["pairs/all"] - 0.25) < 0.055, m
    for probe in PROBES:
        n_cls = len(set(probe_labels(info, "val", probe).values()))
        assert 1 / n_cls - 0.08 < m[f"probe/{probe}"] < m[f"probe/{probe}_chance"] + 0.06, (probe, m)


@pytest.mark.slow
def test_quality_benchmark_quick_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| pairs/all | 0.250 |" in proc.stdout and "tulip/siglip" in proc.stdout
    results = json.loads((tmp_path / "quick" / "results.json").read_text())
    assert set(results["results"]) == {"siglip", "clip_rocket", "tulip", "siglip2", "tulip_siglip2"}
    assert "locca/refer_acc50" in results["results"]["siglip2"][0] and "| locca/refer_acc50 |" in proc.stdout
    for runs in results["results"].values():
        assert len(runs) == 1 and 0.0 <= runs[0]["pairs/all"] <= 1.0 and "probe/count" in runs[0]
    # the same numbers through `tulip-mega eval CHECKPOINT --task scenes`
    ckpt = tmp_path / "quick" / "runs" / "tulip_seed0" / "checkpoints" / "step_0000008"
    proc = subprocess.run([sys.executable, "-m", "tulip_mega.cli", "eval", str(ckpt), "--task", "scenes",
                           "--data", str(tmp_path / "quick" / "data")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((ckpt.parent.parent / "eval" / "step_0000008_scenes.json").read_text())["metrics"]
    assert saved == pytest.approx(results["results"]["tulip"][0])

