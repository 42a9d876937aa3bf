"""Evaluation: metrics against brute-force references, and eval of a trained model under layouts.

- zero-shot top-k and retrieval recall@K on fixed random embeddings equal plain-Python
  brute-force counts written here;
- the quickstart guard: recipes/tiny_cpu.yaml with its own settings (only the layout differs:
  PP=2 on 2 ranks instead of TP=2 x PP=2 on 4, which gives the same numbers up to float
  rounding; test_parallel.py) on `tulip-mega data synth`'s default dataset learns its 30
  colour x shape classes (zero-shot top-1 >= 0.33, 10x chance, issue #14's bar; the recipe's
  own run.seed, 1234, measured 0.781 at TP2 x PP2); the standalone
  `tulip-mega eval` path at other layouts (TP=2; DP=2 with a padded last micro-batch)
  reproduces the in-training numbers, and every val sample is embedded exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tulip_mega.eval.retrieval import retrieval_recall
from tulip_mega.eval.zeroshot import class_embeddings, load_classes, topk_accuracy, zeroshot_accuracy
from tulip_mega.parallel.spawn import run_distributed
from tulip_mega.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- metrics on fixed embeddings ---------------------------------------------------------------
def test_zeroshot_accuracy_matches_brute_force():
    C, P, N, d = 7, 3, 50, 16
    prompts = _unit(C * P, d, 0)
    prompt_class = torch.arange(C).repeat_interleave(P)
    perm = torch.randperm(C * P, generator=torch.Generator().manual_seed(1))  # order must not matter
    classes = class_embeddings(prompts[perm] * 3.0, prompt_class[perm], C)  # nor the prompts' norm
    # reference class embedding: normalised mean of the normalised prompts, by hand
    for c in range(C):
        mean = [sum(prompts[c * P + j][k].item() for j in range(P)) / P for k in range(d)]
        norm = math.sqrt(sum(x * x for x in mean))
        assert classes[c].tolist() == pytest.approx([x / norm for x in mean], abs=1e-6)

    images = _unit(N, d, 2)
    labels = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(3))
    hits = {1: 0, 3: 0, 5: 0}
    for i in range(N):
        scores = [sum(images[i][k].item() * classes[c][k].item() for k in range(d)) for c in range(C)]
        rank = sum(1 for c in range(C) if scores[c] > scores[labels[i]])  # classes strictly better
        for k in hits:
            hits[k] += rank < k
    acc = zeroshot_accuracy(images, labels, classes, ks=(1, 3, 5))
    for k in hits:
        assert acc[k] == pytest.approx(hits[k] / N)
    assert 0 < acc[1] < acc[3] < acc[5] < 1  # the fixture exercises the interesting range
    assert topk_accuracy(torch.eye(4), torch.tensor([0, 1, 2, 0]), ks=(1, 10)) == {1: 0.75, 10: 1.0}


def test_retrieval_recall_matches_brute_force():
    N, d = 40, 8
    text = _unit(N, d, 4)
    image = F.normalize(text + 0.9 * _unit(N, d, 5), dim=-1)  # noisy pairs: partial recall
    image[7] = text[3]  # image 7 equals caption 3: a tie-free but confusing pair

    def recall(queries, candidates, k):
        hits = 0
        for i in range(N):
            sims = [(sum(queries[i][j].item() * candidates[c][j].item() for j in range(d)), c) for c in range(N)]
            top = [c for _, c in sorted(sims, key=lambda x: -x[0])[:k]]
            hits += i in top
        return hits / N

    got = retrieval_recall(image, text, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got[f"image_to_text_r{k}"] == pytest.approx(recall(image, text, k))
        assert got[f"text_to_image_r{k}"] == pytest.approx(recall(text, image, k))
    assert 0 < got["image_to_text_r1"] < got["image_to_text_r10"] < 1
    with pytest.raises(ValueError, match="paired"):
        retrieval_recall(image, text[:5])


def _recall_by_hand(image, text, text_image, k):
    """COCO protocol in plain Python: (image->text, text->image) recall@k, ties counted against."""
    n, m, d = image.shape[0], text.shape[0], image.shape[1]
    sim = [[sum(image[i][j].item() * text[c][j].item() for j in range(d)) for c in range(m)] for i in range(n)]
    i2t = t2i = 0
    for i in range(n):
        mine = [c for c in range(m) if text_image[c] == i]
        best = max(sim[i][c] for c in mine)
        i2t += sum(1 for c in range(m) if c not in mine and sim[i][c] >= best) < k
    for c in range(m):
        own = sim[text_image[c]][c]
        t2i += sum(1 for i in range(n) if i != text_image[c] and sim[i][c] >= own) < k
    return i2t / n, t2i / m


def test_retrieval_several_captions_per_image_matches_hand_count():
    n, d = 20, 8
    counts = [1 + (i * 7) % 6 for i in range(n)]  # 1..6 captions per image, uneven
    owner = torch.tensor([i for i in range(n) for _ in range(counts[i])])
    owner = owner[torch.randperm(len(owner), generator=torch.Generator().manual_seed(6))]  # any caption order
    image = _unit(n, d, 7)
    text = F.normalize(image[owner] + 2.0 * _unit(len(owner), d, 8), dim=-1)  # noisy captions of their image
    got = retrieval_recall(image, text, ks=(1, 3, 5), text_image=owner)
    for k in (1, 3, 5):
        i2t, t2i = _recall_by_hand(image, text, owner.tolist(), k)
        assert got[f"image_to_text_r{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_r{k}"] == pytest.approx(t2i)
    assert 0 < got["text_to_image_r1"] < got["text_to_image_r5"] < 1
    with pytest.raises(ValueError, match=r"images \[3\] have no caption"):
        retrieval_recall(image, text[owner != 3], text_image=owner[owner != 3])


def test_retrieval_one_caption_per_image_is_the_paired_score():
    """text_image = 0..N-1 (or None) gives exactly the paired formula: rank = #(others >= true)."""
    n, d = 64, 8
    text = _unit(n, d, 9)
    image = F.normalize(text + 1.0 * _unit(n, d, 10), dim=-1)
    image[5] = image[9]  # an exact tie
    sims = image @ text.T
    paired_i2t = (sims >= sims.diagonal().unsqueeze(1)).sum(1) - 1
    paired_t2i = (sims.T >= sims.diagonal().unsqueeze(1)).sum(1) - 1
    for owner in (None, torch.arange(n)):
        got = retrieval_recall(image, text, ks=(1, 5, 10), text_image=owner)
        for k in (1, 5, 10):
            assert got[f"image_to_text_r{k}"] == (paired_i2t < k).float().mean().item()
            assert got[f"text_to_image_r{k}"] == (paired_t2i < k).float().mean().item()


def test_retrieval_five_captions_per_image_coco_protocol_vs_pairs():
    """A model that puts each image on its group of 5 (identical) captions: the COCO protocol
    scores recall@1 = 1; scoring the 5 captions as 5 unrelated (image, caption) pairs gives 0
    (the other 4 copies tie with the true caption and count above it)."""
    n, per, d = 10, 5, 16
    image = _unit(n, d, 11)
    owner = torch.arange(n).repeat_interleave(per)
    text = image[owner].clone()
    coco = retrieval_recall(image, text, ks=(1,), text_image=owner)
    pairs = retrieval_recall(image[owner], text, ks=(1,))
    assert coco == {"image_to_text_r1": 1.0, "text_to_image_r1": 1.0}
    assert pairs == {"image_to_text_r1": 0.0, "text_to_image_r1": 0.0}


def test_classes_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="classes.json"):
        load_classes(tmp_path / "nope.json")
    bad = tmp_path / "classes.json"
    bad.write_text(json.dumps({"classes": [{"index": 0, "name": "a", "prompts": ["a"]}]}))
    with pytest.raises(ValueError, match="val_labels"):
        load_classes(bad)
    bad.write_text(json.dumps({"classes": [{"index": 0, "name": "a", "prompts": ["a"]}], "val_labels": {"k": 0}}))
    with pytest.raises(KeyError, match="'other' has no label"):
        load_classes(bad).label("other")


# --- a trained model, evaluated in training and standalone at another layout -------------------
STEPS = 600  # recipes/tiny_cpu.yaml's train.steps (checked below)
EVAL_BATCH = 12  # 256 val samples / DP 2 = 128 per rank = 10 micro-batches of 12 + a padded one of 8
NUM_VAL = 256
# Issue #14's bar for recipes/tiny_cpu.yaml: 10x chance (1/30) in every seed. Measured with
# scripts/quickstart.sh (TP2 x PP2): 0.910 / 0.719 / 0.734 for run.seed 0 / 1 / 2. This run keeps
# the recipe's run.seed, 1234 (0.781 at TP2 x PP2), at another layout, which changes float
# rounding and so the trajectory.
QUICKSTART_TOP1 = 0.33


def train_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train

    return train(load_config(RECIPE, overrides))


def test_quickstart_texts_fit_the_recipe_context(quickstart_data):
    """recipes/tiny_cpu.yaml's model.text.context_length holds every text of the quickstart set
    (captions, paraphrases, hard negatives, zero-shot prompts) with its EOS: none is truncated,
    and the shortest context that does so is the recipe's (padding it to 64 diluted the shape word
    out of the last-token pooling in some seeds; see the recipe)."""
    from tulip_mega.data.tokenizer import Tokenizer
    from harness import read_all
    from tulip_mega.config import load_config

    context = load_config(RECIPE).model.text.context_length
    texts = [p for prompts in load_classes(Path(quickstart_data["dir"]) / "classes.json").prompts for p in prompts]
    for spec in (quickstart_data["train"], quickstart_data["val"]):
        for sample in read_all(spec).values():
            meta = json.loads(sample["json"])
            texts += [sample["txt"].decode(), *meta["paraphrases"], *meta["negatives"]]
    ids = Tokenizer(quickstart_data["tokenizer"], context + 1).encode(texts)
    lengths = (ids != 0).sum(1)  # tokens + EOS (pad id 0)
    assert int(lengths.max()) == context, f"longest text {int(lengths.max())} tokens + EOS, recipe context {context}"


@pytest.fixture(scope="module")
def trained(quickstart_data, tmp_path_factory):
    """recipes/tiny_cpu.yaml as scripts/quickstart.sh runs it (its steps, batch, optimiser, init,
    seed and eval interval) at PP=2 on 2 ranks, on the quickstart's dataset."""
    from tulip_mega.config import load_config

    assert load_config(RECIPE).train.steps == STEPS
    data_dir = Path(quickstart_data["dir"])
    val = quickstart_data["val"]
    out = tmp_path_factory.mktemp("eval_run")
    overrides = [
        f"data.train_shards={quickstart_data['train']}", f"data.tokenizer={quickstart_data['tokenizer']}",
        f"run.output_dir={out}", "run.name=tiny", "logging.tensorboard=false",
        "parallel.tensor_parallel=1", "parallel.pipeline_parallel=2", "checkpoint.interval=0",
        f"eval.zeroshot_shards={val}", f"eval.retrieval_shards={val}", f"eval.batch_size={EVAL_BATCH}",
    ]
    result = run_distributed(train_worker, 2, overrides)[0]
    return {"run": out / "tiny", "checkpoint": result["checkpoint"], "val": val,
            "classes": str(data_dir / "classes.json"), "records": read_metrics(out / "tiny" / "metrics.jsonl")}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_quickstart_recipe_learns_its_classes_and_logs_eval(trained):
    """Guards recipes/tiny_cpu.yaml (scripts/quickstart.sh): it learns its classes (QUICKSTART_TOP1)."""
    records = {r["step"]: r for r in trained["records"]}
    assert sorted(records) == list(range(1, STEPS + 1))
    final = records[STEPS]
    assert "eval/zeroshot/top1" in records[300] and "eval/zeroshot/top1" not in records[299]
    assert final["eval/zeroshot/samples"] == final["eval/retrieval/samples"] == NUM_VAL
    top1 = final["eval/zeroshot/top1"]
    assert top1 >= QUICKSTART_TOP1, (f"recipes/tiny_cpu.yaml: zero-shot top-1 {top1:.3f} on the 30 colour x shape "
                                     f"classes after {STEPS} steps, below {QUICKSTART_TOP1} (run.seed 1234 measured 0.781 at TP2 x PP2)")
    assert final["eval/retrieval/image_to_text_r10"] >= 5 * 10 / NUM_VAL  # chance recall@10 = 10/256
    saved = json.loads((trained["run"] / "eval" / f"step_{STEPS:07d}.json").read_text())
    assert saved["step"] == STEPS
    assert saved["metrics"] == {k: v for k, v in final.items() if k.startswith("eval/")}
    # throughput / health metrics are logged every step
    assert final["data/samples"] == STEPS * 64 and final["data/skipped"] == 0
    # towers (16 patches + 16 tokens) + the contrastive logits over the 64-pair global contrastive
    # batch (3x forward); test_flops.py checks the tower count by hand. By hand here: each tower's
    # 2 layers of width 64 cost 2 x (16 x 98,304 matmul + 4 x 16^2 x 64 attention) = 3,276,800,
    # plus the patch embedding 393,216, the MAP head 348,160 and the text projection 8,192.
    towers = 2 * 3_276_800 + 393_216 + 348_160 + 8_192
    assert final["tflops_per_device"] > 0 and final["model_flops_per_sample"] == 3 * towers + 3 * 2 * 64 * 64
    assert final["step_time"] > 0 and final["peak_memory_gib"] > 0 and final["data_wait"] >= 0
    assert "mfu" not in final  # CPU: no peak to compare against


def standalone_worker(checkpoint: str, val: str, classes: str, out_dir: str) -> dict:
    """`tulip-mega eval` at TP=2 and at DP=2, and a direct check that every sample is embedded once."""
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.eval.runner import Evaluator
    from tulip_mega.evaluate import evaluate_checkpoint

    tp2 = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=1", f"eval.batch_size={EVAL_BATCH}"]
    zs = evaluate_checkpoint(checkpoint, "zeroshot", val, classes, overrides=tp2, out=f"{out_dir}/zs.json")
    layout = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", f"eval.batch_size={EVAL_BATCH}"]
    rt = evaluate_checkpoint(checkpoint, "retrieval", val, overrides=layout, out=f"{out_dir}/rt.json")
    # Out of the box: no classes file given, so the classes.json that `data synth` wrote beside the shards.
    box = evaluate_checkpoint(checkpoint, "zeroshot", val, overrides=layout, out=f"{out_dir}/box.json")

    # The shard reader with label = sample index ("val0000042" -> 42), on the same DP=2 layout.
    from tulip_mega.evaluate import eval_config
    from tulip_mega.launch import resolve_layout
    from tulip_mega.models.build import build_model_chunks

    cfg = eval_config(Path(checkpoint), "retrieval", val, overrides=layout, world_size=2)
    ev = Evaluator(cfg, build_model_chunks(cfg, resolve_layout(cfg, 2)), ["retrieval"])
    got = ev.embedder.embed(ev._shard_batches(val, lambda key: int(key[3:]), with_text=True))
    return {"zs": zs["metrics"], "rt": rt["metrics"], "box": box["metrics"], "labels": got["labels"]}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_standalone_eval_at_another_layout_matches_training(trained, tmp_path):
    final = {r["step"]: r for r in trained["records"]}[STEPS]
    results = run_distributed(standalone_worker, 2, trained["checkpoint"], trained["val"], trained["classes"],
                              str(tmp_path))
    for task in ("zs", "rt", "box"):
        assert results[0][task] == results[1][task], task  # every rank returns the same metrics
    one_sample = 1 / NUM_VAL + 1e-9  # the layouts differ in float rounding only: allow one flipped sample
    for task in ("zs", "rt"):
        for key, value in results[0][task].items():
            if key != "eval/seconds":
                assert value == pytest.approx(final[key], abs=one_sample), key
    saved = json.loads((tmp_path / "zs.json").read_text())
    assert saved["task"] == "zeroshot" and saved["layout"] == [2, 1, 1]  # TP, PP, DP
    assert json.loads((tmp_path / "rt.json").read_text())["layout"] == [1, 1, 2]
    # Out of the box (the classes.json beside the shards, the same file as `classes`): the same numbers.
    for key, value in results[0]["box"].items():
        if key != "eval/seconds":
            assert value == pytest.approx(results[0]["zs"][key], abs=one_sample), key
    # DP=2 with a padded last micro-batch: every val sample exactly once, padding dropped.
    assert sorted(results[0]["labels"].tolist()) == list(range(NUM_VAL))
