"""The DALI loader's per-sample host work, as a pure function of (sample, epoch, position).

Everything the host computes for a sample except reading the tar and decoding its images:
caption checks (``read_caption``), the GeCo ``key.json`` parse, the JPEG header read (image
size, and an early "is this an image" check), the sample's random view parameters and EDA
copy (from generators seeded by (seed, DP rank, epoch, position)), and the tokenisation of
caption, GeCo texts and EDA copy, batched over a chunk of samples.

Why a module of its own: the same ``HostPrep.prepare`` runs in the loader's thread
(``data.reader_workers=0``) or in reader worker processes (``dataloaders.reader_pool``), so a
sample's result cannot depend on where it ran or on how many workers there are; only image
bytes stay with the reader (the result carries no bytes back). Tokenisation is row-independent
(each text is encoded, truncated and padded on its own), so batching it per chunk instead of per
batch gives bit-identical token tensors.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from dataloaders.dali_pipeline import ViewPlan, sample_params
from dataloaders.eda import eda
from dataloaders.simple_loader import _Damage, read_caption
from dataloaders.tokenizer import Tokenizer

__all__ = ["Entry", "HostPrep", "HostSample", "Result"]

# One unit of host work: (epoch, index in epoch, raw sample dict or _Damage marker); the end
# of an epoch is (epoch, -1, None) and its result is None.
Entry = tuple[int, int, Union[dict[str, Any], _Damage, None]]


@dataclass
class HostSample:
    """A sample that passed the host-side checks: its view parameters and token rows."""

    params: np.ndarray  # float32 [views, len(PARAMS)]
    tokens: np.ndarray  # int64 [L] the caption
    has_pos: bool = False  # GeCo edits present and non-empty (an empty file = missing edit)
    has_neg: bool = False
    paraphrases: Optional[np.ndarray] = None  # int64 [P, L], padding rows where invalid
    paraphrase_valid: Optional[np.ndarray] = None  # bool [P]
    negatives: Optional[np.ndarray] = None  # int64 [N, L]
    negative_valid: Optional[np.ndarray] = None  # bool [N]
    eda_tokens: Optional[np.ndarray] = None  # int64 [L]


# A HostSample, a reason string (a counted skip) or None (an uncounted drop).
Result = Union[HostSample, str, None]


def _texts(meta: dict[str, Any], name: str) -> tuple[str, ...]:
    value = meta.get(name, [])
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"json field {name!r} must be a list of strings, got {type(value).__name__}")
    return tuple(t for t in value if t.strip())


@dataclass
class _Checked:
    """Between the per-sample checks and the chunk's one tokeniser call."""

    params: np.ndarray
    caption: str
    paraphrases: tuple[str, ...]
    negatives: tuple[str, ...]
    eda: Optional[str]
    has_pos: bool
    has_neg: bool


class HostPrep:
    """Picklable settings + ``prepare(entries)``: what a reader worker (or the loader) runs."""

    def __init__(self, plan: ViewPlan, tokenizer: Tokenizer, seed: int, dp_rank: int) -> None:
        self.plan, self.tokenizer, self.seed, self.dp_rank = plan, tokenizer, seed, dp_rank

    def check(self, item: dict[str, Any] | _Damage, epoch: int, index: int) -> _Checked | str | None:
        """Every per-sample check and random draw (no tokenisation)."""
        caption = read_caption(item)
        if not isinstance(caption, tuple):
            return caption
        caption = caption[0]
        plan = self.plan
        paraphrases: tuple[str, ...] = ()
        negatives: tuple[str, ...] = ()
        if plan.needs_json and "json" in item:
            try:
                meta = json.loads(item["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
                paraphrases, negatives = _texts(meta, "paraphrases"), _texts(meta, "negatives")
            except (UnicodeDecodeError, ValueError) as e:
                return f"malformed json ({e})"
        try:  # header only: the size for the crop windows, and an early check that it is an image
            with Image.open(io.BytesIO(item["jpg"])) as im:
                width, height = im.size
        except Exception as e:  # noqa: BLE001 - PIL raises many types for garbage
            return f"undecodable image ({type(e).__name__}: {e})"
        rng = np.random.default_rng([self.seed, self.dp_rank, epoch, index])
        text_rng = random.Random(f"eda/{self.seed}/{self.dp_rank}/{epoch}/{index}")
        return _Checked(
            params=sample_params(rng, width, height, plan), caption=caption,
            paraphrases=paraphrases[: plan.paraphrases], negatives=negatives[: plan.negatives],
            eda=eda(caption, text_rng, plan.eda_config) if plan.eda else None,
            has_pos=bool(item.get("pos.jpg")) if plan.edits else False,
            has_neg=bool(item.get("neg.jpg")) if plan.edits else False,
        )

    def prepare(self, entries: list[Entry]) -> list[Result]:
        """One result per entry, in order; the chunk's texts go through the tokeniser once."""
        plan = self.plan
        checked = [self.check(item, epoch, index) if item is not None else None for epoch, index, item in entries]
        good = [c for c in checked if isinstance(c, _Checked)]
        texts: list[str] = []
        for c in good:
            texts.append(c.caption)
            texts += list(c.paraphrases) + [""] * (plan.paraphrases - len(c.paraphrases))
            texts += list(c.negatives) + [""] * (plan.negatives - len(c.negatives))
            if plan.eda:
                texts.append(c.eda or c.caption)
        rows = self.tokenizer.encode(texts).numpy() if texts else None  # [texts, L]
        pad = self.tokenizer.pad_id
        out: list[Result] = []
        r = 0
        for c in checked:
            if not isinstance(c, _Checked):
                out.append(c)
                continue
            s = HostSample(params=c.params, tokens=rows[r], has_pos=c.has_pos, has_neg=c.has_neg)
            r += 1
            for name, count, got in (("paraphrases", plan.paraphrases, c.paraphrases),
                                     ("negatives", plan.negatives, c.negatives)):
                if count:
                    valid = np.arange(count) < len(got)
                    block = rows[r : r + count].copy()
                    block[~valid] = pad
                    setattr(s, name, block)
                    setattr(s, "paraphrase_valid" if name == "paraphrases" else "negative_valid", valid)
                    r += count
            if plan.eda:
                s.eda_tokens = rows[r]
                r += 1
            out.append(s)
        return out
