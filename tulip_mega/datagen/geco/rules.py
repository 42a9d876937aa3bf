"""Rule-based GeCo text (``--model eda``): for machines without an instruction LLM.

Why rules at all: the GeCo loss terms need paraphrases and hard negatives in ``key.json``;
a cluster without a cached LLM (or a CPU box, or CI) should still be able to produce shards
of the right shape. The quality is far below an LLM's, so every sample it writes says
``"method": "rules"`` in ``key.json["geco_text"]`` and a run mixing both is visible.

- paraphrases: EDA synonym replacement only (``tulip_mega.data.eda`` with every other operation
  off: swaps and deletions can change the meaning), then, if nothing had a synonym, a framing
  ("a photo of ...");
- negatives, one per edit kind when the caption has a word the rule applies to: ``object``
  (a noun to another of its group), ``attribute`` (a colour or size to another), ``count``
  (a number to another, or "a X" to "two Xs"), ``relation`` (on/under, left/right, ...).

Every random choice comes from ``random.Random`` seeded by (shard seed, key), so the output
is a pure function of (seed, shard, key, caption).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any, Optional

from tulip_mega.data.eda import EdaConfig, eda
from tulip_mega.datagen.geco.text import GecoTexts, GenerationSettings, validate_texts

__all__ = ["OBJECT_GROUPS", "RuleTextGenerator", "edit_caption", "paraphrase_caption"]

OBJECT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("circle", "square", "triangle", "star", "cross", "hexagon", "heart"),
    ("dog", "cat", "horse", "cow", "bird", "sheep", "bear"),
    ("man", "woman", "child", "boy", "girl"),
    ("car", "bus", "truck", "bicycle", "motorcycle", "train"),
    ("table", "chair", "bed", "sofa", "bench", "desk"),
    ("cup", "bottle", "bowl", "glass", "plate"),
    ("apple", "banana", "pizza", "cake", "sandwich"),
    ("tree", "flower", "bush", "rock"),
    ("house", "tower", "bridge", "church"),
)
_ATTRIBUTE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "brown", "pink"),
    ("big", "small", "large", "tiny", "huge"),
    ("wooden", "metal", "plastic", "stone"),
    ("old", "new", "young"),
    ("open", "closed"),
    ("wet", "dry"),
)
_NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_RELATIONS: tuple[tuple[str, str], ...] = (
    ("on top of", "underneath"), ("in front of", "behind"), ("next to", "far from"),
    ("on", "under"), ("above", "below"), ("left", "right"), ("inside", "outside"),
    ("over", "beneath"), ("into", "out of"), ("towards", "away from"),
)
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people",
                      "sheep": "sheep", "mouse": "mice", "foot": "feet", "tooth": "teeth"}
_FRAMINGS = ("a photo of {}", "an image showing {}", "a picture of {}")
_SYNONYMS_ONLY = EdaConfig(synonym=1.0, swap=0.0, deletion=0.0, stopword=0.0)
_WORD = re.compile(r"[A-Za-z]+|\d+|[^A-Za-z\d]+")


def _group_of(word: str, groups: tuple[tuple[str, ...], ...]) -> Optional[tuple[str, ...]]:
    return next((g for g in groups if word in g), None)


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _swap_in_group(tokens: list[str], groups: tuple[tuple[str, ...], ...], rng: random.Random) -> Optional[str]:
    places = [i for i, t in enumerate(tokens) if _group_of(t.lower(), groups)]
    if not places:
        return None
    i = rng.choice(places)
    group = _group_of(tokens[i].lower(), groups)
    assert group is not None
    out = list(tokens)
    out[i] = rng.choice([w for w in group if w != tokens[i].lower()])
    return "".join(out)


def _change_count(tokens: list[str], rng: random.Random) -> Optional[str]:
    lower = [t.lower() for t in tokens]
    numbers = [i for i, t in enumerate(lower) if t in _NUMBERS or t.isdigit()]
    out = list(tokens)
    if numbers:
        i = rng.choice(numbers)
        if lower[i].isdigit():
            out[i] = str(int(lower[i]) + rng.choice([1, 2]))
        else:
            out[i] = rng.choice([n for n in _NUMBERS if n != lower[i]])
        return "".join(out)
    nouns = {w for g in OBJECT_GROUPS for w in g} | set(_IRREGULAR_PLURALS)
    for i, t in enumerate(lower):
        if t not in ("a", "an"):
            continue
        # the noun of this article: the first known object within the next 3 words
        words = [j for j in range(i + 1, len(tokens)) if tokens[j].strip() and tokens[j].isalpha()][:3]
        noun = next((j for j in words if lower[j] in nouns), None)
        if noun is not None:
            out[i] = rng.choice(_NUMBERS[1:4])
            out[noun] = _plural(lower[noun])
            return "".join(out)
    return None


def _change_relation(caption: str, rng: random.Random) -> Optional[str]:
    found = []
    for a, b in _RELATIONS:
        for src, dst in ((a, b), (b, a)):
            for m in re.finditer(rf"\b{re.escape(src)}\b", caption, flags=re.IGNORECASE):
                found.append((m.start(), m.end(), dst))
    if not found:
        return None
    # longest phrase first at a position ("on top of" wins over "on"), then pick one
    found.sort(key=lambda f: (f[0], -(f[1] - f[0])))
    start, end, dst = rng.choice([f for k, f in enumerate(found) if k == 0 or f[0] >= found[k - 1][1]])
    return caption[:start] + dst + caption[end:]


def edit_caption(caption: str, kind: str, rng: random.Random) -> Optional[str]:
    """One meaning-changing edit of ``kind``, or None when no rule applies to this caption."""
    tokens = _WORD.findall(caption)
    if kind == "object":
        return _swap_in_group(tokens, OBJECT_GROUPS, rng)
    if kind == "attribute":
        return _swap_in_group(tokens, _ATTRIBUTE_GROUPS, rng)
    if kind == "count":
        return _change_count(tokens, rng)
    if kind == "relation":
        return _change_relation(caption, rng)
    raise ValueError(f"unknown edit kind {kind!r}")


def paraphrase_caption(caption: str, index: int, rng: random.Random) -> str:
    """EDA synonym replacement; the ``index``-th framing when no word had a synonym."""
    text = eda(caption, rng, _SYNONYMS_ONLY)
    if text.split() == caption.split():
        text = _FRAMINGS[index % len(_FRAMINGS)].format(caption)
    return text


class RuleTextGenerator:
    """The ``--model eda`` generator: same interface as ``text.LLMTextGenerator``."""

    method = "rules"
    name = "eda"

    def __init__(self, settings: GenerationSettings = GenerationSettings()) -> None:
        self.settings = settings
        self._shard_seed = 0

    def start_shard(self, shard_seed: int) -> None:
        """Remember the shard's seed; each sample's RNG is derived from it and the key."""
        self._shard_seed = shard_seed

    def generate(self, captions: Sequence[str], keys: Sequence[str]) -> list[GecoTexts]:
        """Validated texts for each caption (same validation as the LLM's output)."""
        results = []
        for caption, key in zip(captions, keys, strict=True):
            rng = random.Random(f"geco-rules/{self._shard_seed}/{key}")
            paras = [paraphrase_caption(caption, i, rng) for i in range(self.settings.num_paraphrases)]
            edits = [(kind, edit_caption(caption, kind, rng)) for kind in self.settings.edit_kinds]
            edits = [(k, e) for k, e in edits if e is not None]
            results.append(validate_texts(caption, paras, [e for _, e in edits], [k for k, _ in edits],
                                          self.settings))
        return results

    def metadata(self) -> dict[str, Any]:
        """Marks the output as rule-based (not an LLM) in ``key.json["geco_text"]``."""
        return {"method": self.method, "model": self.name,
                "note": "rule-based fallback (EDA synonyms + word-swap edits), not an LLM"}
