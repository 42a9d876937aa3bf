"""Eval sets in the formats users already have (tulip_mega/eval/formats.py), written here as the
published formats specify (no download):

- CLIP_benchmark's webdataset layout (its builder.py `build_wds_dataset`): `<root>/test/{0..N-1}.tar`
  + `nshards.txt`, `classnames.txt`, `zeroshot_classification_templates.txt` with `{c}`,
  `dataset_type.txt` = retrieval; images as .webp / .png / .jpg / .jpeg, `.cls` labels, `.txt`
  with one caption per line (1-4 captions per image here);
- a torchvision ImageFolder tree; an ImageNet-1k tree (1000 WordNet-id folders).

The evaluator's numbers on a random debug model at DP = 2 (uneven shards, a short last
micro-batch) equal an independent computation: each image decoded with plain PIL, each text
tokenised, both embedded by one forward of the same model on rank 0, metrics counted by hand.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval_sets import write_tar
from harness import make_cfg
from tulip_mega.config import ConfigError
from tulip_mega.eval.formats import load_classification, load_retrieval, shipped
from tulip_mega.parallel.spawn import run_distributed

SIZE = 32  # the debug model's image size
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
FIELDS = ("webp", "png", "jpg", "jpeg")


def _image(colour: tuple[int, int, int], seed: int, fmt: str) -> bytes:
    """A noisy image of a colour, of an odd size (resized by the reader), encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    h, w = 20 + seed % 13, 24 + seed % 7  # below 2 x SIZE: no JPEG draft scaling
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return out.getvalue()


def write_clip_benchmark_classification(root: Path, per_shard=(7, 4)) -> None:
    names = list(COLOURS)
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\na {c} thing\n")
    n = 0
    for s, count in enumerate(per_shard):
        samples = []
        for _ in range(count):
            c = n % len(names)
            samples.append({"__key__": f"s{n:05d}", FIELDS[n % 4]: _image(COLOURS[names[c]], n, FIELDS[n % 4]),
                            "cls": str(c).encode()})
            n += 1
        write_tar(root / "test" / f"{s}.tar", samples)
    (root / "test" / "nshards.txt").write_text(f"{len(per_shard)}\n")


def write_clip_benchmark_probe(root: Path) -> None:
    """Train (two shards) and test splits of a classification set, for a linear probe."""
    names = list(COLOURS)
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    n = 0
    for split, shards in (("train", (10, 8)), ("test", (9,))):
        (root / split).mkdir(parents=True)
        for s, count in enumerate(shards):
            samples = []
            for _ in range(count):
                c = (n * 7) % 3
                samples.append({"__key__": f"p{n:05d}", "png": _image(COLOURS[names[c]], 700 + n, "png"),
                                "cls": str(c).encode()})
                n += 1
            write_tar(root / split / f"{s}.tar", samples)
        (root / split / "nshards.txt").write_text(f"{len(shards)}\n")


def write_clip_benchmark_retrieval(root: Path, per_shard=(5, 4, 2)) -> None:
    names = list(COLOURS)
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    n = 0
    for s, count in enumerate(per_shard):
        samples = []
        for _ in range(count):
            name = names[n % 3]
            captions = [f"a {name} picture", f"something {name}", f"{name} noise number {n}", "a photo"][: 1 + n % 4]
            samples.append({"__key__": f"r{n:05d}", FIELDS[n % 4]: _image(COLOURS[name], 100 + n, FIELDS[n % 4]),
                            "txt": "\n".join(captions).encode()})
            n += 1
        write_tar(root / "test" / f"{s}.tar", samples)
    (root / "test" / "nshards.txt").write_text(f"{len(per_shard)}\n")


def write_imagefolder(root: Path, per_class: int = 3) -> None:
    for c, (name, colour) in enumerate(sorted(COLOURS.items())):
        (root / name / "sub").mkdir(parents=True)
        for i in range(per_class):
            fmt = FIELDS[(c + i) % 4]
            where = root / name / ("sub" if i == 0 else "")
            (where / f"img{i}.{fmt.upper() if i == 1 else fmt}").write_bytes(_image(colour, 200 + 10 * c + i, fmt))
        (root / name / "notes.txt").write_text("not an image")


MMVP_PATTERNS = ("Orientation", "Color and Appearance", "Quantity")


def write_mmvp(root: Path, pairs_per_pattern: int = 3) -> None:
    """MMVP-VLM as released: Questions.csv (qid, pattern, statement; a pair = two rows) and
    MMVP_VLM_Images/<pattern>/<qid>.jpg, qids from 1."""
    rows, qid, names = ["Question ID,Type,Statement"], 1, list(COLOURS)
    for pattern in MMVP_PATTERNS:
        (root / "MMVP_VLM_Images" / pattern).mkdir(parents=True)
        for p in range(pairs_per_pattern):
            for j in range(2):
                name = names[(qid + p) % 3]
                rows.append(f'{qid},{pattern},"the {name} one, seen {j}"')
                (root / "MMVP_VLM_Images" / pattern / f"{qid}.jpg").write_bytes(
                    _image(COLOURS[name], 300 + qid, "jpg"))
                qid += 1
    (root / "Questions.csv").write_text("\n".join(rows) + "\n")


def _mmvp_by_hand(root: Path, model, tok) -> dict[str, float]:
    """MMVP's scripts/evaluate_vlm.py, restated: consecutive CSV rows are a pair; per statement
    the softmax over the pair's two images of logit_scale * cosine, img1 when > 0.5; truth
    img1 for odd qids; a pair is right when both are; per pattern in blocks of pairs."""
    import csv

    rows = list(csv.reader(open(root / "Questions.csv")))[1:]
    right: dict[str, list] = {}
    for a, b in zip(rows[::2], rows[1::2]):
        q1, q2 = int(a[0]), int(b[0])
        img = _embed(model, tok, images=[(root / "MMVP_VLM_Images" / a[1] / f"{q}.jpg").read_bytes() for q in (q1, q2)])
        ok = True
        for q, statement in ((q1, a[2]), (q2, b[2])):
            txt = _embed(model, tok, texts=["a photo of " + statement])
            probs = (10.0 * img @ txt.T).flatten().softmax(0)
            ok = ok and ("img1" if probs[0] > 0.5 else "img2") == ("img1" if q % 2 == 1 else "img2")
        right.setdefault(a[1], []).append(ok)
    return {p: sum(v) / len(v) for p, v in right.items()}


# --- the independent reference -------------------------------------------------------------------
def _pil_pixels(data: bytes) -> torch.Tensor:
    rgb = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255 * 2 - 1


def _embed(model, tokenizer, images: list[bytes] = (), texts: list[str] = ()) -> torch.Tensor:
    """One plain forward of the whole list (the other tower gets zeros)."""
    n = len(images) or len(texts)
    pixels = torch.stack([_pil_pixels(b) for b in images]) if images else torch.zeros(n, 3, SIZE, SIZE)
    tokens = tokenizer.encode(list(texts)) if texts else torch.zeros(n, tokenizer.context_length, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        out = model(pixels, tokens)
    return (out.image_emb if images else out.text_emb).float()


def _read_wds(root: Path) -> list[dict[str, bytes]]:
    samples = []
    for s in range(int((root / "test" / "nshards.txt").read_text())):
        with tarfile.open(root / "test" / f"{s}.tar") as tar:
            by_key: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                by_key.setdefault(key, {})[ext] = tar.extractfile(m).read()
            samples += list(by_key.values())
    return samples


def _zeroshot_by_hand(image_emb, labels, prompt_emb_per_class) -> float:
    classes = [F.normalize(F.normalize(p, dim=-1).mean(0), dim=0) for p in prompt_emb_per_class]
    hits = 0
    for x, y in zip(image_emb, labels):
        scores = [float(x @ c) for c in classes]
        hits += max(range(len(scores)), key=lambda c: (scores[c], -c)) == y
    return hits / len(labels)


def _recall_by_hand(image_emb, text_emb, owner, k) -> tuple[float, float]:
    sim = image_emb @ text_emb.T
    i2t = sum(sum(1 for c in range(len(owner)) if owner[c] != i and sim[i, c] >= max(sim[i, j] for j in
              range(len(owner)) if owner[j] == i)) < k for i in range(len(image_emb)))
    t2i = sum(sum(1 for i in range(len(image_emb)) if i != owner[c] and sim[i, c] >= sim[owner[c], c]) < k
              for c in range(len(owner)))
    return i2t / len(image_emb), t2i / len(owner)


def formats_worker(tokenizer: str, cls_root: str, ret_root: str, folder: str, templates: str, mmvp: str,
                   probe: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.data.tokenizer import Tokenizer
    from tulip_mega.eval.runner import Evaluator
    from tulip_mega.launch import resolve_layout
    from tulip_mega.models.build import build_model_chunks
    from tulip_mega.parallel.init import init_parallel

    base = [f"data.tokenizer={tokenizer}", "eval.batch_size=4", "parallel.tensor_parallel=1",
            "parallel.pipeline_parallel=1"]
    cfg = make_cfg(base + [f"eval.zeroshot_shards={cls_root}", "eval.zeroshot_format=clip_benchmark",
                           f"eval.retrieval_shards={ret_root}", "eval.retrieval_format=clip_benchmark",
                           f"eval.mmvp_path={mmvp}"])
    init_parallel(1, 1, cfg.run.seed)
    parts = build_model_chunks(cfg, resolve_layout(cfg, torch.distributed.get_world_size()))
    model = parts[0]  # TP = PP = 1: one part, the whole model, for the plain reference forwards
    out = {"wds": Evaluator(cfg, parts).run()}
    folder_cfg = make_cfg(base + [f"eval.zeroshot_shards={folder}", "eval.zeroshot_format=imagefolder",
                                  f"eval.zeroshot_templates={templates}"])
    out["folder"] = Evaluator(folder_cfg, parts, ["zeroshot"]).run()
    probe_cfg = make_cfg(base + [f"eval.linear_probe_shards={probe}", f"eval.linear_probe_val_shards={probe}",
                                 "eval.linear_probe_format=clip_benchmark"])
    out["probe"] = Evaluator(probe_cfg, parts, ["linear_probe"]).run()
    if torch.distributed.get_rank() == 0:  # the reference: plain PIL, one forward, counted by hand
        tok = Tokenizer(tokenizer, context_length=cfg.model.text.context_length)
        names = (Path(cls_root) / "classnames.txt").read_text().split()
        own = ["a photo of a {c}.", "{c}", "a {c} thing"]
        prompts = [_embed(model, tok, texts=[t.format(c=n) for t in own]) for n in names]
        samples = _read_wds(Path(cls_root))
        images = [next(s[f] for f in FIELDS if f in s) for s in samples]
        out["ref_wds_top1"] = _zeroshot_by_hand(_embed(model, tok, images=images),
                                                [int(s["cls"]) for s in samples], prompts)
        samples = _read_wds(Path(ret_root))
        image_emb = _embed(model, tok, images=[next(s[f] for f in FIELDS if f in s) for s in samples])
        captions = [(c, i) for i, s in enumerate(samples) for c in s["txt"].decode().splitlines()]
        text_emb = _embed(model, tok, texts=[c for c, _ in captions])
        out["ref_recall"] = {k: _recall_by_hand(image_emb, text_emb, [i for _, i in captions], k) for k in (1, 5, 10)}
        out["ref_captions"] = len(captions)
        classes = sorted(COLOURS)
        files = [(p, c) for c, name in enumerate(classes) for p in sorted(Path(folder, name).rglob("*"))
                 if p.suffix.lower().lstrip(".") in FIELDS]
        tmpl = Path(templates).read_text().splitlines()
        prompts = [_embed(model, tok, texts=[t.format(c=n) for t in tmpl]) for n in classes]
        out["ref_folder_top1"] = _zeroshot_by_hand(_embed(model, tok, images=[p.read_bytes() for p, _ in files]),
                                                   [c for _, c in files], prompts)
        out["ref_folder_samples"] = len(files)
        out["ref_mmvp"] = _mmvp_by_hand(Path(mmvp), model, tok)
        from tulip_mega.eval.linear_probe import linear_probe

        split = {}
        for name in ("train", "test"):  # in (shard, position) order: the evaluator's canonical order
            root = Path(probe)
            samples = []
            for s in range(int((root / name / "nshards.txt").read_text())):
                with tarfile.open(root / name / f"{s}.tar") as tar:
                    files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
                samples += [(files[k], int(files[k[:-4] + ".cls"])) for k in sorted(files) if k.endswith(".png")]
            split[name] = (_embed(model, tok, images=[b for b, _ in samples]), torch.tensor([c for _, c in samples]))
        out["ref_probe"] = linear_probe(*split["train"], *split["test"], 3, seed=cfg.run.seed)
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_clip_benchmark_and_imagefolder_sets_match_an_independent_computation(shapes_data, tmp_path):
    cls_root, ret_root, folder = tmp_path / "cls", tmp_path / "ret", tmp_path / "folder"
    write_clip_benchmark_classification(cls_root)
    write_clip_benchmark_retrieval(ret_root)
    write_imagefolder(folder)
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c} image\nthe colour {c}\n")
    write_mmvp(tmp_path / "mmvp")
    write_clip_benchmark_probe(tmp_path / "probe")
    results = run_distributed(formats_worker, 2, shapes_data["tokenizer"], str(cls_root), str(ret_root),
                              str(folder), str(templates), str(tmp_path / "mmvp"), str(tmp_path / "probe"))
    ref, got = results[0], results[0]["wds"]
    for key in got:
        if key != "eval/seconds":
            assert got[key] == results[1]["wds"][key], key  # every rank returns the same metrics
    assert got["eval/zeroshot/samples"] == 11
    assert got["eval/zeroshot/top1"] == pytest.approx(ref["ref_wds_top1"], abs=1e-6)
    assert got["eval/retrieval/samples"] == 11 and got["eval/retrieval/captions"] == ref["ref_captions"] == 26
    for k in (1, 5, 10):
        i2t, t2i = ref["ref_recall"][k]
        assert got[f"eval/retrieval/image_to_text_r{k}"] == pytest.approx(i2t, abs=1e-6), k
        assert got[f"eval/retrieval/text_to_image_r{k}"] == pytest.approx(t2i, abs=1e-6), k
    assert 0 < got["eval/retrieval/text_to_image_r1"] < got["eval/retrieval/text_to_image_r10"] < 1
    mmvp = {p: got[f"eval/mmvp/pattern_{p.lower().replace(' ', '_')}"] for p in MMVP_PATTERNS}
    assert mmvp == pytest.approx(ref["ref_mmvp"])
    assert got["eval/mmvp/average"] == pytest.approx(sum(mmvp.values()) / 3) and got["eval/mmvp/pairs"] == 9
    probe, ref_probe = results[0]["probe"], ref["ref_probe"]
    assert probe["eval/linear_probe/train_samples"] == 18 and probe["eval/linear_probe/samples"] == 9
    for key in ("top1", "l2", "holdout_top1"):
        assert probe[f"eval/linear_probe/{key}"] == pytest.approx(ref_probe[key]), key
    assert [probe[f"eval/linear_probe/holdout_top1_l2_{10.0 ** e:g}"] for e in range(-6, 3)] == pytest.approx(
        ref_probe["sweep"])
    folder_got = results[0]["folder"]
    assert folder_got["eval/zeroshot/samples"] == ref["ref_folder_samples"] == 9
    assert folder_got["eval/zeroshot/top1"] == pytest.approx(ref["ref_folder_top1"], abs=1e-6)


def test_imagefolder_and_imagenet_readers(tmp_path):
    write_imagefolder(tmp_path / "f")
    ds = load_classification("imagefolder", str(tmp_path / "f"))
    assert ds.names == ["blue", "green", "red"]
    assert ds.prompts[0][0] == "a bad photo of a blue." and len(ds.prompts[0]) == 80  # OpenAI's 80 by default
    items = list(ds.items(0, 1))
    assert [i.label for i in items] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    halves = [i.uid for i in ds.items(0, 2)] + [i.uid for i in ds.items(1, 2)]
    assert sorted(halves) == list(range(9))  # DP ranks: disjoint, together all

    net = tmp_path / "imagenet"
    wnids = [f"n{i:08d}" for i in range(1000)]
    for w in wnids:
        (net / w).mkdir(parents=True)
    (net / wnids[1] / "a.JPEG").write_bytes(_image((1, 2, 3), 0, "jpeg"))
    (net / wnids[999] / "b.JPEG").write_bytes(_image((1, 2, 3), 1, "jpeg"))
    ds = load_classification("imagenet", str(net))
    assert ds.names[:2] == ["tench", "goldfish"] and ds.names[999] == "toilet paper"
    assert [i.label for i in ds.items(0, 1)] == [1, 999]
    assert ds.prompts[1][:2] == ["a bad photo of a goldfish.", "a photo of many goldfish."]
    siglip = load_classification("imagenet", str(net), templates="siglip")
    assert siglip.prompts[1][:2] == ["a bad photo of a goldfish", "a photo of many goldfish"]
    assert len(shipped("siglip_imagenet_templates.txt")) == 81
    os.rmdir(net / wnids[5])
    with pytest.raises(ValueError, match="1000 WordNet-id class folders.*found 999"):
        load_classification("imagenet", str(net))


def test_format_errors_say_where_and_what(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test/nshards.txt does not exist: a CLIP_benchmark webdataset"):
        load_classification("clip_benchmark", str(tmp_path))
    write_clip_benchmark_retrieval(tmp_path / "ret")
    with pytest.raises(ConfigError, match="dataset_type.txt says 'retrieval': not a classification set"):
        load_classification("clip_benchmark", str(tmp_path / "ret"))
    write_clip_benchmark_classification(tmp_path / "cls")
    with pytest.raises(ConfigError, match="must say 'retrieval'.*found 'classification'"):
        load_retrieval(str(tmp_path / "cls"))
    (tmp_path / "cls" / "zeroshot_classification_templates.txt").write_text("a photo\n")
    with pytest.raises(ConfigError, match=r"each hold '\{c\}'"):
        load_classification("clip_benchmark", str(tmp_path / "cls"))
    (tmp_path / "cls" / "classnames.txt").write_text("red\n")
    ds = load_classification("clip_benchmark", str(tmp_path / "cls"), templates="openai")
    with pytest.raises(ValueError, match="has class 1, outside 0..0"):
        list(ds.items(0, 1))
    with pytest.raises(ConfigError, match="eval.zeroshot_format='tfds'"):
        make_cfg(["eval.zeroshot_format=tfds"])
