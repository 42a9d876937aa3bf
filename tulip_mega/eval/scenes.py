"""The scenes benchmark: zero-shot per attribute, MMVP-style pairs, linear probes (pure torch).

On the held-out split of `tulip-mega data synth --kind scenes` (tulip_mega/datagen/synthetic_scenes.py):

- **zero-shot per attribute**: for each val image and each attribute its scene can change in
  (count, size, colour, shape, position, binding), the candidates are its canonical caption and
  every caption whose scene differs in exactly that attribute; a hit when the true caption
  scores strictly highest. Reported with the chance level (mean of 1 / candidates);
- **MMVP-style pairs**: the val split comes in pairs of images whose scenes differ in exactly one
  attribute; a pair counts only if both images score their own caption above the other's
  (chance 0.25). Reported over all pairs and per attribute;
- **linear probes** on the frozen image embeddings (logistic regression as in
  eval/linear_probe.py, fitted on the train split, val top-1) for count, size, colour and shape
  (count scenes) and position (relation scenes).

Everything here takes embeddings, so any model fits: `scene_metrics(info, val_emb, train_emb,
text_emb)` with L2-normalised image embeddings per sample key and text embeddings per caption
(`captions_needed(info)` lists them). `plain_model_metrics` embeds with an exported
TulipPlainModel (tulip-mega convert --to pytorch) and the PIL loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from tulip_mega.datagen.synthetic_scenes import ATTRIBUTES, alternatives, applicable, caption
from tulip_mega.eval.linear_probe import linear_probe

PROBES = ("count", "size", "colour", "shape", "position")
# Probe cost bounds (the benchmark fits 5 probes per model): every other L2 strength of
# eval/linear_probe.py's L2_GRID up to 1e-2 (on these L2-normalised 64-d embeddings the weights
# must be large; in a trial run a grid from 1e-4 up cut the colour probe from 0.41 to 0.24), and at
# most PROBE_MAX_ITER L-BFGS iterations per fit (near-separable weak-penalty fits otherwise run
# to the 1000-iteration cap; the cap acts as early stopping).
PROBE_L2_GRID = (1e-6, 1e-4, 1e-2)
PROBE_MAX_ITER = 200
_PROBE_FIELD = {"count": ("count", "counts"), "size": ("size", "sizes"), "colour": ("colour", "colours"),
                "shape": ("shape", "shapes"), "position": ("relation", "relations")}


def load_scenes(path: Union[str, Path]) -> dict[str, Any]:
    """Read a scenes.json; errors name the file and the missing field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (write one with `tulip-mega data synth --kind scenes`)")
    info = json.loads(path.read_text())
    missing = [f for f in ("train", "val", "pairs", "counts", "relations") if f not in info]
    if missing:
        raise ValueError(f"{path} has no {missing} field(s) (keys: {sorted(info)})")
    return info


def candidates(scene: dict[str, Any], attribute: str) -> list[str]:
    """The true canonical caption first, then every caption differing in exactly `attribute`."""
    return [caption(scene)] + [caption(s) for s in alternatives(scene, attribute)]


def captions_needed(info: dict[str, Any]) -> list[str]:
    """Every caption the zero-shot and pair evaluations score (sorted, unique)."""
    out: set[str] = set()
    for scene in info["val"].values():
        for attr in applicable(scene):
            out.update(candidates(scene, attr))
    return sorted(out)


def attribute_zeroshot(scenes: list[dict[str, Any]], image_emb: torch.Tensor,
                       text: Callable[[list[str]], torch.Tensor]) -> dict[str, float]:
    """{attr: accuracy, attr_chance: mean 1/candidates} for every attribute some scene has."""
    hits: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    chance: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    for i, scene in enumerate(scenes):
        for attr in applicable(scene):
            cand = candidates(scene, attr)
            scores = text(cand).float() @ image_emb[i].float()  # [k]
            hits[attr].append(float(bool(scores[0] > scores[1:].max())))
            chance[attr].append(1.0 / len(cand))
    out: dict[str, float] = {}
    for a in ATTRIBUTES:
        if hits[a]:
            out[a] = sum(hits[a]) / len(hits[a])
            out[f"{a}_chance"] = sum(chance[a]) / len(chance[a])
    return out


def pair_accuracy(pairs: list[tuple[int, int, str]], scenes: list[dict[str, Any]], image_emb: torch.Tensor,
                  text: Callable[[list[str]], torch.Tensor]) -> dict[str, float]:
    """MMVP-style: a pair (i, j) counts when image i prefers caption i AND image j caption j."""
    per: dict[str, list[float]] = {}
    for i, j, attr in pairs:
        t = text([caption(scenes[i]), caption(scenes[j])]).float()  # [2, e]
        si, sj = t @ image_emb[i].float(), t @ image_emb[j].float()
        per.setdefault(attr, []).append(float(bool(si[0] > si[1] and sj[1] > sj[0])))
    every = [v for vs in per.values() for v in vs]
    out = {"all": sum(every) / len(every) if every else 0.0, "all_chance": 0.25, "pairs": float(len(every))}
    out.update({a: sum(v) / len(v) for a, v in sorted(per.items())})
    return out


def probe_labels(info: dict[str, Any], split: str, probe: str) -> dict[str, int]:
    """key -> class index of the samples a probe applies to (count scenes, or relation scenes)."""
    field, vocab = _PROBE_FIELD[probe]
    values = info[vocab]
    return {k: values.index(s[field]) for k, s in info[split].items() if field in s}


def probes(info: dict[str, Any], train_emb: dict[str, torch.Tensor], val_emb: dict[str, torch.Tensor],
           names: tuple[str, ...] = PROBES, seed: int = 0, max_train: Optional[int] = 1024) -> dict[str, float]:
    """Val top-1 of a logistic regression on frozen image embeddings, per probe, and its chance
    (the majority class). Fitted on at most `max_train` train samples per probe (the first by
    key: the L2 sweep fits 10 models, so this bounds the time)."""
    out: dict[str, float] = {}
    for probe in names:
        tr, va = probe_labels(info, "train", probe), probe_labels(info, "val", probe)
        tr = {k: v for k, v in tr.items() if k in train_emb}
        va = {k: v for k, v in va.items() if k in val_emb}
        n_cls = len(info[_PROBE_FIELD[probe][1]])
        tk, vk = sorted(tr)[:max_train], sorted(va)
        res = linear_probe(torch.stack([train_emb[k] for k in tk]), torch.tensor([tr[k] for k in tk]),
                           torch.stack([val_emb[k] for k in vk]), torch.tensor([va[k] for k in vk]), n_cls, seed=seed,
                           l2_grid=PROBE_L2_GRID, max_iter=PROBE_MAX_ITER)
        out[probe] = res["top1"]
        counts = torch.bincount(torch.tensor([va[k] for k in vk]), minlength=n_cls).double()
        out[f"{probe}_chance"] = float(counts.max() / counts.sum())  # majority class
    return out


def scene_metrics(info: dict[str, Any], val_emb: dict[str, torch.Tensor], train_emb: dict[str, torch.Tensor],
                  text_emb: dict[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """All scenes metrics, keyed zeroshot/<attr>, pairs/<attr>, probe/<name> (each with _chance)."""
    keys = sorted(info["val"])
    missing = [k for k in keys if k not in val_emb]
    if missing:
        raise KeyError(f"no image embedding for {len(missing)} val keys, e.g. {missing[:3]}")
    scenes = [info["val"][k] for k in keys]
    image = torch.stack([val_emb[k] for k in keys]).float()
    index = {k: i for i, k in enumerate(keys)}

    def text(captions: list[str]) -> torch.Tensor:
        return torch.stack([text_emb[c] for c in captions])

    out = {f"zeroshot/{k}": v for k, v in attribute_zeroshot(scenes, image, text).items()}
    pairs = [(index[a], index[b], attr) for a, b, attr in info["pairs"]]
    out.update({f"pairs/{k}": v for k, v in pair_accuracy(pairs, scenes, image, text).items()})
    if train_emb:
        out.update({f"probe/{k}": v for k, v in probes(info, train_emb, val_emb, seed=seed).items()})
    return out


def headline(metrics: dict[str, float]) -> list[str]:
    """The metric names worth a table row (no chance levels or counts)."""
    return [k for k in metrics if not k.endswith("_chance") and not k.endswith("/pairs")]


# --- embedding with an exported plain model ------------------------------------------------------
def _embed_images(model, shards: str, tokenizer, image_size: int, batch: int = 64) -> dict[str, torch.Tensor]:
    from tulip_mega.data.simple_loader import SimpleLoader

    loader = SimpleLoader(shards, batch_size=batch, image_size=image_size, tokenizer=tokenizer, shuffle_buffer=0,
                          num_epochs=1)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for b in loader:
            for k, e in zip(b.keys, model.encode_image(b.images)):
                out[k] = e
    return out


def plain_model_metrics(model_dir: Union[str, Path], data_dir: Union[str, Path], tokenizer_path: str,
                        seed: int = 0, probe_train: bool = True) -> dict[str, float]:
    """Scenes metrics of a TulipPlainModel folder on the scenes set in `data_dir` (single process)."""
    from tulip_mega.data.tokenizer import Tokenizer
    from tulip_mega.convert.plain_model import TulipPlainModel

    data_dir = Path(data_dir)
    model = TulipPlainModel.from_pretrained(model_dir).float()
    tok = Tokenizer(tokenizer_path, context_length=model.config.text["context_length"])
    size = model.config.vision["image_size"]
    info = load_scenes(data_dir / "scenes.json")
    val = _embed_images(model, str(data_dir / "val-*.tar"), tok, size)
    train = _embed_images(model, str(data_dir / "train-*.tar"), tok, size) if probe_train else {}
    caps = captions_needed(info)
    with torch.no_grad():
        emb = torch.cat([model.encode_text(tok.encode(caps[i : i + 256])) for i in range(0, len(caps), 256)])
    return scene_metrics(info, val, train, dict(zip(caps, emb)), seed=seed)
