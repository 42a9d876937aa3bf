"""The DALI loader's per-sample host work, split by what it depends on.

Everything the host computes for a sample except reading the tar and decoding its images, in
two parts:

- ``inspect`` depends on the sample alone: caption checks (``read_caption``), the GeCo
  ``key.json`` parse, the image header read (jpg, webp or png: size, and an early "is this an image"
  check), and the tokenisation of the caption and GeCo texts. Reader workers run it right
  after reading a shard, before the shuffle buffer (``tulip_mega.data.reader_pool``).
- ``draw`` depends on the sample's position too: its random view parameters and EDA copy,
  drawn from generators seeded by (seed, DP rank, epoch, index in epoch), and the EDA copy's
  tokens. It can only run once the shuffle buffer has fixed the position; the loader then
  runs it itself or hands chunks of positions to the reader workers.

Why: the same two functions run whether or not there are worker processes, so a sample's
result cannot depend on where it ran or on the worker count. Tokenisation is row-independent
(each text is encoded, truncated and padded on its own), so batching it per chunk instead of
per batch gives bit-identical token tensors.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from tulip_mega.data.dali_pipeline import ViewPlan, sample_params
from tulip_mega.data.eda import eda
from tulip_mega.data.image_files import all_image_files, edit_file, image_file
from tulip_mega.data.sample_stream import Damaged, Entry, read_caption
from tulip_mega.data.tokenizer import Tokenizer

__all__ = ["HOST", "IMAGE_FILES", "Drawn", "HostPrep", "HostSample", "Inspected", "Request", "Result"]

IMAGE_FILES = all_image_files()  # the files DALI may decode: key.{jpg,jpeg,webp,png} and the GeCo edits
# The key under which a reader worker stores a sample's ``inspect`` result in the sample dict.
HOST = "__host__"
# One unit of position-dependent work is a sample_stream.Entry: (epoch, index in epoch, sample
# dict or Damaged record); the end of an epoch is (epoch, -1, None) and its result is None.


@dataclass
class Inspected:
    """What ``inspect`` learns from a good sample alone (no random draws)."""

    caption: str
    width: int
    height: int
    tokens: np.ndarray  # int64 [L] the caption
    has_pos: bool = False  # GeCo edits present and non-empty (an empty file = missing edit)
    has_neg: bool = False
    paraphrases: Optional[np.ndarray] = None  # int64 [P, L], padding rows where invalid
    paraphrase_valid: Optional[np.ndarray] = None  # bool [P]
    negatives: Optional[np.ndarray] = None  # int64 [N, L]
    negative_valid: Optional[np.ndarray] = None  # bool [N]
    region_tokens: Optional[np.ndarray] = None  # int64 [R, L] region captions, padding rows where absent
    region_boxes: Optional[np.ndarray] = None  # float32 [R, 4] (x0, y0, x1, y1) in [0, 1] of the image
    region_valid: Optional[np.ndarray] = None  # bool [R]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Positional fields: unpickles in about half the time of the default (state dict), and
        # the loader thread unpickles one per sample that a reader worker sends.
        return Inspected, (self.caption, self.width, self.height, self.tokens, self.has_pos, self.has_neg,
                           self.paraphrases, self.paraphrase_valid, self.negatives, self.negative_valid,
                           self.region_tokens, self.region_boxes, self.region_valid)


@dataclass
class HostSample:
    """A sample that passed the host-side checks, with every random choice made."""

    info: Inspected
    params: np.ndarray  # float32 [views, len(PARAMS)]
    eda_tokens: Optional[np.ndarray] = None  # int64 [L]


# A HostSample, a reason string (a counted skip) or None (an uncounted drop).
Result = Union[HostSample, str, None]
# What ``draw`` needs per good sample: (epoch, index in epoch, width, height, caption) ...
Request = tuple[int, int, int, int, str]
# ... and what it gives back: (view parameters [views, len(PARAMS)], EDA tokens [L] or None).
Drawn = tuple[np.ndarray, Optional[np.ndarray]]


def _texts(meta: dict[str, Any], name: str) -> tuple[str, ...]:
    value = meta.get(name, [])
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"json field {name!r} must be a list of strings, got {type(value).__name__}")
    return tuple(t for t in value if t.strip())


Region = tuple[tuple[float, float, float, float], str]


def _regions(meta: dict[str, Any]) -> tuple[Region, ...]:
    """The optional ``regions`` json field: a list of {"box": [x0, y0, x1, y1], "caption": str},
    the box in fractions of the image (0 <= x0 < x1 <= 1, same for y). A malformed entry makes
    the sample bad data (skipped with this reason), never a silently wrong target."""
    value = meta.get("regions", [])
    if not isinstance(value, list):
        raise ValueError(f"json field 'regions' must be a list, got {type(value).__name__}")
    out = []
    for i, region in enumerate(value):
        box = region.get("box") if isinstance(region, dict) else None
        text = region.get("caption") if isinstance(region, dict) else None
        if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1)):
            raise ValueError(f"regions[{i}].box must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and "
                             f"0 <= y0 < y1 <= 1, got {box!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"regions[{i}].caption must be a non-empty string, got {text!r}")
        out.append((tuple(float(v) for v in box), text))
    return tuple(out)


def _has_edit(item: dict[str, Any], edit: str) -> bool:
    """Whether GeCo edit ``edit`` is present and non-empty (an empty file = a missing edit)."""
    name = edit_file(item, edit)
    return name is not None and bool(item.get(name))


_VALID = {"paraphrases": "paraphrase_valid", "negatives": "negative_valid", "region_tokens": "region_valid"}


class HostPrep:
    """Picklable settings + ``inspect`` (reader workers) and ``prepare`` (the loader)."""

    def __init__(self, plan: ViewPlan, tokenizer: Tokenizer, seed: int, dp_rank: int) -> None:
        self.plan, self.tokenizer, self.seed, self.dp_rank = plan, tokenizer, seed, dp_rank
        # Without random views nothing is drawn: one shared parameter matrix, no generator per sample.
        self._plain = None if plan.uses_params else sample_params(None, 1, 1, plan)  # type: ignore[arg-type]

    def _check(self, item: dict[str, Any]) -> tuple | str | None:
        """(caption, paraphrases, negatives, regions, width, height), or the reason it is bad data."""
        caption = read_caption(item)
        if not isinstance(caption, tuple):
            return caption
        plan = self.plan
        paraphrases: tuple[str, ...] = ()
        negatives: tuple[str, ...] = ()
        regions: tuple[Region, ...] = ()
        # Only the GeCo fields are read: img2dataset's / DataComp's own keys (url, key, status,
        # width, exif, uid, clip scores, ...) are ignored, and a json without GeCo fields is a
        # sample with none (valid masks False), never bad data.
        if plan.needs_json and "json" in item:
            try:
                meta = json.loads(item["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
                paraphrases, negatives = _texts(meta, "paraphrases"), _texts(meta, "negatives")
                regions = _regions(meta) if plan.regions else ()
            except (UnicodeDecodeError, ValueError) as e:
                return f"malformed json ({e})"
        try:  # header only: the size for the crop windows, and an early check that it is an image
            with Image.open(io.BytesIO(item[image_file(item)])) as im:
                width, height = im.size
        except Exception as e:  # noqa: BLE001 - PIL raises many types for garbage
            return f"undecodable image ({type(e).__name__}: {e})"
        return (caption[0], paraphrases[: plan.paraphrases], negatives[: plan.negatives], regions[: plan.regions],
                width, height)

    def inspect(self, items: list[dict[str, Any]]) -> list[Inspected | str | None]:
        """One result per sample dict: Inspected, a reason string (counted skip) or None
        (uncounted drop); the texts of all good samples go through the tokeniser once."""
        plan = self.plan
        checked = [self._check(item) for item in items]
        texts: list[str] = []
        for c in checked:
            if isinstance(c, tuple):
                caption, paraphrases, negatives, regions, _, _ = c
                texts.append(caption)
                texts += list(paraphrases) + [""] * (plan.paraphrases - len(paraphrases))
                texts += list(negatives) + [""] * (plan.negatives - len(negatives))
                texts += [text for _, text in regions] + [""] * (plan.regions - len(regions))
        rows = self.tokenizer.encode(texts).numpy() if texts else None  # [texts, L]
        pad = self.tokenizer.pad_id
        out: list[Inspected | str | None] = []
        r = 0
        for item, c in zip(items, checked):
            if not isinstance(c, tuple):
                out.append(c)
                continue
            caption, paraphrases, negatives, regions, width, height = c
            info = Inspected(caption=caption, width=width, height=height, tokens=rows[r],
                             has_pos=_has_edit(item, "pos") if plan.edits else False,
                             has_neg=_has_edit(item, "neg") if plan.edits else False)
            r += 1
            for name, count, got in (("paraphrases", plan.paraphrases, paraphrases),
                                     ("negatives", plan.negatives, negatives), ("region_tokens", plan.regions, regions)):
                if count:
                    valid = np.arange(count) < len(got)
                    block = rows[r : r + count].copy()
                    block[~valid] = pad
                    setattr(info, name, block)
                    setattr(info, _VALID[name], valid)
                    r += count
            if plan.regions:
                info.region_boxes = np.zeros((plan.regions, 4), dtype=np.float32)
                for i, (box, _) in enumerate(regions):
                    info.region_boxes[i] = box
            out.append(info)
        return out

    def record(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What a reader worker sends back: each sample dict with its ``inspect`` result under
        ``HOST``, without the text files (already parsed and tokenised) and, where
        ``__offsets__`` says where they are (``iter_samples(offsets=True)``), without the image
        bytes: the loader reads those back with ``read_file`` when it feeds DALI, so a worker's
        queue holds ~1 KB per sample and can run a whole shard ahead."""
        drop = {"txt", "json"}
        out = []
        for item, info in zip(items, self.inspect(items)):
            where = item.get("__offsets__", {})
            gone = drop | {ext for ext in IMAGE_FILES if ext in where}
            out.append({**{k: v for k, v in item.items() if k not in gone}, HOST: info})
        return out

    def infos(self, entries: list[Entry]) -> list[Inspected | str | None]:
        """``inspect`` results for a chunk: taken from the records a worker made, computed
        here for raw samples (no workers), the damage message for a ``Damaged`` record."""
        raw = [item for _, _, item in entries if isinstance(item, dict) and HOST not in item]
        fresh = iter(self.inspect(raw) if raw else [])
        out: list[Inspected | str | None] = []
        for _, _, item in entries:
            if item is None:
                out.append(None)
            elif isinstance(item, Damaged):
                out.append(item.message)
            else:
                out.append(item[HOST] if HOST in item else next(fresh))
        return out

    @property
    def draws_anything(self) -> bool:
        """False when no sample draws a random number (plain SigLIP): nothing worth shipping."""
        return self._plain is None or self.plan.eda

    @staticmethod
    def requests(entries: list[Entry], infos: list[Inspected | str | None]) -> list[Request]:
        """What ``draw`` needs for the good samples of a chunk: position, image size, caption."""
        return [(epoch, index, info.width, info.height, info.caption)
                for (epoch, index, _), info in zip(entries, infos) if isinstance(info, Inspected)]

    def draw(self, requests: list[Request]) -> list[Drawn]:
        """The position-dependent draws: view parameters from a generator seeded by (seed, DP
        rank, epoch, index), the EDA copy from one seeded the same way, and the EDA copies'
        tokens (one tokeniser call). Runs in the loader or in a reader worker (same values)."""
        plan = self.plan
        params: list[np.ndarray] = []
        eda_texts: list[str] = []
        for epoch, index, width, height, caption in requests:
            if self._plain is None:
                rng = np.random.default_rng([self.seed, self.dp_rank, epoch, index])
                params.append(sample_params(rng, width, height, plan))
            else:
                params.append(self._plain)
            if plan.eda:
                text_rng = random.Random(f"eda/{self.seed}/{self.dp_rank}/{epoch}/{index}")
                eda_texts.append(eda(caption, text_rng, plan.eda_config) or caption)
        rows = list(self.tokenizer.encode(eda_texts).numpy()) if eda_texts else [None] * len(params)
        return list(zip(params, rows))

    @staticmethod
    def assemble(infos: list[Inspected | str | None], drawn: list[Drawn]) -> list[Result]:
        """One result per entry: a HostSample for each good sample (in order), else its reason."""
        answers = iter(drawn)
        out: list[Result] = []
        for info in infos:
            if isinstance(info, Inspected):
                params, eda_tokens = next(answers)
                out.append(HostSample(info=info, params=params, eda_tokens=eda_tokens))
            else:
                out.append(info)
        return out

    def prepare(self, entries: list[Entry]) -> list[Result]:
        """One result per entry, in order, all computed here (``infos``, ``draw``, ``assemble``)."""
        infos = self.infos(entries)
        if not self.draws_anything:  # what draw() gives then, without building its requests
            return [HostSample(info=info, params=self._plain, eda_tokens=None) if isinstance(info, Inspected) else info
                    for info in infos]
        return self.assemble(infos, self.draw(self.requests(entries, infos)))
