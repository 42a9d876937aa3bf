"""Linear probe: our torch logistic regression equals scikit-learn's on the same features, and
`tulip-mega eval --task linear_probe` at PP=2 equals the probe on the plain model's features."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from tulip_mega.eval.linear_probe import HOLDOUT, L2_GRID, fit_logistic, linear_probe, load_probe_labels, top1
from tulip_mega.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


def _blobs(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes (so the penalty matters), unit-normalised like embeddings."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centers = torch.randn(c, d, generator=g)
    x = centers[y] + 1.5 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1), y


def _sklearn(x, y, l2):
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000)
    return ref.fit(x.double().numpy(), y.numpy())


@pytest.mark.parametrize("l2", [1e-3, 1e-1, 10.0])
def test_fit_equals_sklearn_logistic_regression(l2):
    pytest.importorskip("sklearn")
    x, y = _blobs(300, 16, 5, seed=0)
    w, b = fit_logistic(x, y, 5, l2)
    ref = _sklearn(x, y, l2)
    # sklearn's multinomial weights are defined up to a per-feature shift over classes; the
    # penalty pins it (sum over classes = 0) for W, and we compare the bias via the logits.
    torch.testing.assert_close(w, torch.from_numpy(ref.coef_), rtol=0, atol=1e-4)
    logits = x.double() @ w.T + b
    ref_logits = torch.from_numpy(ref.decision_function(x.double().numpy()))
    torch.testing.assert_close(logits - logits.mean(1, keepdim=True), ref_logits - ref_logits.mean(1, keepdim=True),
                               rtol=0, atol=1e-4)


def test_probe_sweeps_l2_on_a_holdout_and_refits_like_sklearn():
    pytest.importorskip("sklearn")
    x, y = _blobs(400, 16, 5, seed=1)
    g = torch.Generator().manual_seed(7)
    idx = torch.randperm(400, generator=g)
    (tx, ty), (vx, vy) = (x[idx[:300]], y[idx[:300]]), (x[idx[300:]], y[idx[300:]])
    got = linear_probe(tx, ty, vx, vy, 5, seed=3)

    # The same protocol with scikit-learn: seeded held-out slice, best C, refit, val top-1.
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    n_hold = int(round(HOLDOUT * 300))
    hold, fit = perm[:n_hold].numpy(), perm[n_hold:].numpy()
    scores = [(_sklearn(tx[fit], ty[fit], l2).score(tx[hold].double().numpy(), ty[hold].numpy()), l2)
              for l2 in L2_GRID]
    best_score, best_l2 = max(scores)
    ref = _sklearn(tx, ty, best_l2)
    assert got["l2"] == best_l2 and got["holdout_top1"] == pytest.approx(best_score)
    assert got["top1"] == pytest.approx(ref.score(vx.double().numpy(), vy.numpy()))
    assert 0.3 < got["top1"] < 1.0  # an interesting regime: neither chance nor separable


def test_labels_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="classes.json with 'classes' and 'labels'"):
        load_probe_labels(tmp_path / "classes.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": [{"index": 0, "name": "a"}], "train_labels": {"k1": 3}}))
    with pytest.raises(ValueError, match=r"bad.json: labels outside 0..0: \{'k1': 3\}"):
        load_probe_labels(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"classes": [{"index": 0, "name": "a"}], "train_labels": {"k1": 0}}))
    with pytest.raises(KeyError, match="sample key 'zz' has no label in .*ok.json"):
        load_probe_labels(ok).label("zz")


# --- end to end ---------------------------------------------------------------------------------
def train_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train

    return train(load_config(RECIPE, overrides))


def probe_worker(checkpoint: str, data: str, val: str, out: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, "linear_probe", data, val=val, out=out,
                               overrides=["parallel.tensor_parallel=1", "parallel.pipeline_parallel=2",
                                          "eval.batch_size=8"])["metrics"]


def probe_classes(data_dir: Path) -> Path:
    """classes.json over the synthetic backgrounds, labels for the train and val keys."""
    from tulip_mega.datagen.synthetic import BACKGROUNDS
    from harness import background_labels

    path = data_dir / "classes.json"
    path.write_text(json.dumps({"classes": [{"index": i, "name": b} for i, b in enumerate(BACKGROUNDS)],
                                "labels": background_labels(data_dir, "*.tar")}))
    return path


@pytest.mark.multiprocess
def test_eval_linear_probe_at_pp2_equals_probe_on_plain_features(shapes_data, tmp_path):
    from tulip_mega.data.shards import expand_shards
    from tulip_mega.data.simple_loader import SimpleLoader
    from tulip_mega.data.tokenizer import Tokenizer
    from tulip_mega.convert.plain import convert_checkpoint
    from tulip_mega.convert.plain_model import TulipPlainModel

    src = Path(shapes_data["train"]).parent
    data_dir = tmp_path / "probe_data"  # a copy: the classes.json beside these shards is the probe's
    data_dir.mkdir()
    for name in ("train-000000.tar", "val-000000.tar"):
        (data_dir / name).write_bytes((src / name).read_bytes())
    classes = probe_classes(data_dir)
    train, val = str(data_dir / "train-000000.tar"), str(data_dir / "val-000000.tar")
    overrides = [f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
                 f"run.output_dir={tmp_path}", "run.name=probe", "train.steps=2", "optim.warmup_steps=1",
                 "logging.tensorboard=false", "eval.interval=0", "parallel.tensor_parallel=1",
                 "parallel.pipeline_parallel=1", "parallel.sequence_parallel=false", "model.init_std=0.2"]
    checkpoint = run_distributed(train_worker, 1, overrides)[0]["checkpoint"]
    got = run_distributed(probe_worker, 2, checkpoint, train, val, str(tmp_path / "probe.json"))[0]
    assert json.loads((tmp_path / "probe.json").read_text())["metrics"] == got

    # Reference: the plain model's features of the same PIL-decoded images, in the same order.
    convert_checkpoint(checkpoint, tmp_path / "plain", log=lambda s: None)
    model = TulipPlainModel.from_pretrained(tmp_path / "plain")
    labels = load_probe_labels(classes)
    tok = Tokenizer(shapes_data["tokenizer"], 64)

    def features(shards: str):
        loader = SimpleLoader(expand_shards(shards), batch_size=64, image_size=32, tokenizer=tok, dp_rank=0,
                              dp_size=1, seed=0, shuffle_buffer=0, num_epochs=1)
        xs, keys = [], []
        for batch in loader:
            with torch.no_grad():
                xs.append(model.encode_image(batch.images))
            keys += list(batch.keys)
        order = sorted(range(len(keys)), key=lambda i: zlib.crc32(keys[i].encode()))
        return torch.cat(xs)[order], torch.tensor([labels.label(keys[i]) for i in order])

    (tx, ty), (vx, vy) = features(train), features(val)
    ref = linear_probe(tx, ty, vx, vy, len(labels.names), seed=0)
    got = {k.split("/")[-1]: v for k, v in got.items()}
    print(f"linear probe: tulip-mega eval (PP=2) {got}, plain features {ref}")
    assert got["samples"] == len(vy) == 128 and got["train_samples"] == len(ty) == 128
    assert got["l2"] in L2_GRID
    # Tolerance: PP=2 and the plain model give features 1e-7 apart; at the weak penalties the
    # sweep may pick, the fit amplifies that (it moves by ~noise / l2), so a sample near a
    # decision boundary can flip: one of the 26 held-out samples in the sweep, two val samples.
    n_hold = int(round(HOLDOUT * len(ty)))
    assert abs(got["holdout_top1"] - ref["holdout_top1"]) <= 1 / n_hold + 1e-9
    w, b = fit_logistic(tx, ty, len(labels.names), got["l2"])
    assert abs(got["top1"] - top1(w, b, vx, vy)) <= 2 / len(vy) + 1e-9
    assert got["top1"] > 2 / len(labels.names)  # the background colour is linearly readable (3 neutral ones)
