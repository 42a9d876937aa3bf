"""EDA ("easy data augmentation") of captions, as used by the improved CLIP baseline (clip-rocket).

Each of the four operations is applied to a caption with its own probability (docs/losses.md, clip-rocket:
synonym 0.4, swap 0.4, deletion 0.2, stop-word removal 0.8; recipe keys data.augment.eda_*):

- synonym replacement: ``n = max(1, round(alpha * words))`` words that have synonyms in
  ``eda_words.SYNONYMS`` (stop words excluded) are replaced by a random synonym;
- random swap: ``n`` times, two random positions exchange their words;
- random deletion: every word is dropped with probability ``alpha`` (one always survives);
- stop-word removal: every word in ``eda_words.STOP_WORDS`` is dropped (one always survives).

``alpha`` = 0.1 as in the EDA paper. The operations run in that fixed order and draw only from
the ``random.Random`` they are given, so the loader makes the output a pure function of
(seed, DP rank, position): exact resume and identical TP ranks need nothing else.
"""

from __future__ import annotations

import random
from typing import Optional
from dataclasses import dataclass

from tulip_mega.data.eda_words import STOP_WORDS, SYNONYMS

__all__ = ["EdaConfig", "eda"]

_ALPHA = 0.1


@dataclass(frozen=True)
class EdaConfig:
    """Probabilities of the four EDA operations (per caption); the defaults are clip-rocket's,
    the same as the recipe's ``data.augment.eda_*`` defaults."""

    synonym: float = 0.4
    swap: float = 0.4
    deletion: float = 0.2
    stopword: float = 0.8


def _bare(word: str) -> str:
    return word.lower().strip(".,;:!?\"'()")


def _synonyms(words: list[str], n: int, rng: random.Random) -> list[str]:
    candidates = [i for i, w in enumerate(words) if _bare(w) in SYNONYMS and _bare(w) not in STOP_WORDS]
    rng.shuffle(candidates)
    out = list(words)
    for i in candidates[:n]:
        out[i] = rng.choice(SYNONYMS[_bare(words[i])])
    return out


def _swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    return out


def _keep_some(words: list[str], kept: list[str], rng: random.Random) -> list[str]:
    """Never return an empty caption: keep one random original word instead."""
    return kept if kept or not words else [rng.choice(words)]


def eda(text: str, rng: random.Random, config: Optional[EdaConfig] = None) -> str:
    """One EDA-augmented copy of ``text`` (never empty when ``text`` has a word); `config`
    None = the defaults."""
    config = config or EdaConfig()
    words = text.split()
    if not words:
        return text
    n = max(1, round(_ALPHA * len(words)))
    if rng.random() < config.synonym:
        words = " ".join(_synonyms(words, n, rng)).split()  # synonyms may be two words
    if rng.random() < config.swap:
        words = _swap(words, n, rng)
    if rng.random() < config.deletion:
        words = _keep_some(words, [w for w in words if rng.random() >= _ALPHA], rng)
    if rng.random() < config.stopword:
        words = _keep_some(words, [w for w in words if _bare(w) not in STOP_WORDS], rng)
    return " ".join(words)
