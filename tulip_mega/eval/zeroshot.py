"""Zero-shot classification: class names x prompt templates -> a text classifier -> top-k.

As in CLIP / SigLIP: every prompt of a class ("a red circle", "a photo of a red circle", ...)
is embedded by the text tower; the class embedding is the re-normalised mean of its prompts'
L2-normalised embeddings; an image is classified by its cosine similarity to every class
embedding (the logit scale and bias are monotone, so they do not change the ranking).

The class list is a `classes.json` as written by tulip_mega/datagen/synthetic.py:
`{"classes": [{"index": i, "name": ..., "prompts": [...]}, ...], "val_labels": {key: i}}`.
The same format works for any labelled set: `prompts` per class, `val_labels` per sample key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClassSet:
    """Names, prompts per class, and the class index of every evaluated sample key."""

    names: list[str]
    prompts: list[list[str]]
    labels: dict[str, int]
    path: str = ""

    def __len__(self) -> int:
        return len(self.names)

    def label(self, key: str) -> int:
        """Class index of a sample; a clear error when the sample is not in classes.json."""
        try:
            return self.labels[key]
        except KeyError:
            raise KeyError(f"sample key {key!r} has no label in {self.path or 'classes.json'} (val_labels holds "
                           f"{len(self.labels)} keys, e.g. {sorted(self.labels)[:3]}); are the zero-shot shards "
                           "the split this classes.json describes?") from None


def load_classes(path: Union[str, Path]) -> ClassSet:
    """Read a classes.json; errors name the file and the missing field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist (expected a classes.json with 'classes' and "
                                "'val_labels', e.g. from `tulip-mega data synth`)")
    info = json.loads(path.read_text())
    for field in ("classes", "val_labels"):
        if field not in info:
            raise ValueError(f"{path} has no {field!r} field (keys: {sorted(info)})")
    classes = sorted(info["classes"], key=lambda c: c["index"])
    if [c["index"] for c in classes] != list(range(len(classes))):
        raise ValueError(f"{path}: class indices must be 0..{len(classes) - 1} without gaps")
    for c in classes:
        if not c.get("prompts"):
            raise ValueError(f"{path}: class {c.get('name', c['index'])!r} has no prompts")
    labels = {str(k): int(v) for k, v in info["val_labels"].items()}
    bad = [k for k, v in labels.items() if not 0 <= v < len(classes)]
    if bad:
        raise ValueError(f"{path}: val_labels of {bad[:3]} are not class indices in [0, {len(classes)})")
    return ClassSet([c["name"] for c in classes], [list(c["prompts"]) for c in classes], labels, str(path))


def class_embeddings(prompt_emb: torch.Tensor, prompt_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of the normalised prompt embeddings of each class, re-normalised: [C, e].

    prompt_emb [P, e] and prompt_class [P] may come in any order (e.g. gathered over ranks)."""
    emb = F.normalize(prompt_emb.float(), dim=-1)
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums.index_add_(0, prompt_class.long(), emb)
    counts = torch.bincount(prompt_class.long(), minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing[:5]} have no prompt embeddings")
    return F.normalize(sums, dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest logits, for each k (k > C counts as C)."""
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top == labels.long().unsqueeze(1)
    return {k: hit[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in ks}


def zeroshot_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                      ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy of classifying normalised image embeddings [N, e] by class embeddings [C, e]."""
    return topk_accuracy(image_emb.float() @ class_emb.float().T, labels, ks)
