"""Linear probe: frozen image features -> multinomial logistic regression -> top-1 on a val set.

The protocol TULIP reports for RxRx1 and fine-grained sets, as in the CLIP paper: embed the
train and val images with the frozen image tower (the L2-normalised embeddings the other eval
tasks use), fit an L2-regularised logistic regression on the train features, report val top-1.
The L2 strength is swept, CLIP-style, over `L2_GRID` on a held-out `HOLDOUT` slice of train (a
fixed seeded permutation), the best one refit on all of train. Runs in torch (full-batch
L-BFGS, float64) so no scikit-learn is needed; the objective is scikit-learn's
`LogisticRegression` one with C = 1 / (l2 * n): mean cross-entropy + l2/2 * ||W||^2, bias free.

Labels come from a classes.json beside the train shards (or --classes): `classes` (index, name)
and any of `labels`, `train_labels`, `val_labels` mapping sample key -> class index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

L2_GRID = tuple(10.0 ** e for e in range(-6, 3))  # 1e-6 .. 1e2
HOLDOUT = 0.2


@dataclass(frozen=True)
class ProbeLabels:
    """Class names and the class index of every labelled sample key (train and val)."""

    names: list[str]
    labels: dict[str, int]
    path: str

    def label(self, key: str) -> int:
        try:
            return self.labels[key]
        except KeyError:
            raise KeyError(f"sample key {key!r} has no label in {self.path} (labels / train_labels / val_labels "
                           f"hold {len(self.labels)} keys, e.g. {sorted(self.labels)[:3]})") from None


def load_probe_labels(path: Union[str, Path]) -> ProbeLabels:
    """Read a classes.json for the probe; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist (the linear probe needs a classes.json with "
                                "'classes' and 'labels' / 'train_labels' / 'val_labels' beside the train shards, "
                                "or --classes)")
    info = json.loads(path.read_text())
    if "classes" not in info:
        raise ValueError(f"{path} has no 'classes' field (keys: {sorted(info)})")
    classes = sorted(info["classes"], key=lambda c: c["index"])
    if [c["index"] for c in classes] != list(range(len(classes))):
        raise ValueError(f"{path}: class indices must be 0..{len(classes) - 1} without gaps")
    labels: dict[str, int] = {}
    for field in ("labels", "train_labels", "val_labels"):
        labels.update(info.get(field) or {})
    if not labels:
        raise ValueError(f"{path} has no 'labels', 'train_labels' or 'val_labels' (sample key -> class index)")
    bad = {k: v for k, v in labels.items() if not (isinstance(v, int) and 0 <= v < len(classes))}
    if bad:
        raise ValueError(f"{path}: labels outside 0..{len(classes) - 1}: {dict(list(bad.items())[:3])}")
    return ProbeLabels([c.get("name", str(c["index"])) for c in classes], labels, str(path))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, D], b [C]) minimising mean CE(x W^T + b, y) + l2/2 ||W||^2 (full-batch L-BFGS, float64)."""
    x, y = x.double(), y.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def top1(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() @ w.T + b).argmax(dim=1) == y).double().mean().item() if len(y) else 0.0


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, seed: int = 0, l2_grid: tuple[float, ...] = L2_GRID,
                 max_iter: int = 1000) -> dict[str, float]:
    """Sweep the L2 strength (over `l2_grid`) on a held-out slice of train, refit on all of train, val top-1.

    `max_iter` caps the L-BFGS iterations of each fit; `sweep` holds the held-out top-1 of every
    grid value (in grid order)."""
    n = len(train_y)
    if n < 2 or len(val_y) == 0:
        raise ValueError(f"linear probe needs >= 2 train and >= 1 val samples, got {n} and {len(val_y)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(HOLDOUT * n)))
    hold, fit = perm[:n_hold], perm[n_hold:]
    scores = []
    for l2 in l2_grid:
        w, b = fit_logistic(train_x[fit], train_y[fit], num_classes, l2, max_iter)
        scores.append(top1(w, b, train_x[hold], train_y[hold]))
    best = max(range(len(l2_grid)), key=lambda i: (scores[i], l2_grid[i]))  # ties: the stronger penalty
    w, b = fit_logistic(train_x, train_y, num_classes, l2_grid[best], max_iter)
    return {"top1": top1(w, b, val_x, val_y), "l2": l2_grid[best], "holdout_top1": scores[best],
            "train_samples": float(n), "samples": float(len(val_y)), "sweep": scores}
