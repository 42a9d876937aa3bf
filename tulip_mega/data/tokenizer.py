"""SentencePiece tokenizer: training on captions and fixed-length batch encoding.

Ids follow T5 / SigLIP (pad=0, eos=1, unk=2, no bos) so the text tower's padding and
"last token" conventions match the reference models. Text is lower-cased both for training
and encoding, as SigLIP does, which also keeps tiny vocabularies useful. Encoding always
ends a sequence with eos, even when truncated, because the text tower pools at/up to it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import sentencepiece as spm
import torch

from tulip_mega.data.shards import ShardReadError, expand_shards, iter_samples

__all__ = ["Tokenizer", "iter_shard_texts", "train_tokenizer", "train_tokenizer_from_shards"]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_MAX_SEED_WORDS = 100_000
MAKE_ONE = "tulip-mega tokenizer train --data SHARDS --out PREFIX"


def _clean(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        t = " ".join(str(t).lower().split())
        if t:
            yield t


def train_tokenizer(texts: Iterable[str], out_prefix: str, vocab_size: int = 1024, seed: int = 0) -> str:
    """Train a unigram SentencePiece model on ``texts``; returns ``<out_prefix>.model``.

    ``hard_vocab_limit=False`` makes ``vocab_size`` an upper bound, so a 1024 vocab works on a
    few hundred captions (the model simply ends up smaller; read ``Tokenizer.vocab_size``).
    """
    corpus = list(_clean(texts))
    if not corpus:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    # SentencePiece only seeds the unigram vocabulary with substrings that are followed by
    # different things somewhere; in templated captions ("a picture of ...") many whole words
    # never are, and the model degrades to characters. Adding each frequent word once as its
    # own sentence gives every word a sentence end to branch at (a +1 count, noise for real data).
    words = Counter(w for t in corpus for w in t.split())
    corpus += [w for w, n in words.most_common(_MAX_SEED_WORDS) if n >= 2]
    parent = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(parent, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=out_prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",  # we already lower-case and squeeze spaces
        minloglevel=2,  # errors only: no multi-page training log
        num_threads=min(16, os.cpu_count() or 1),
    )
    return out_prefix + ".model"


def iter_shard_texts(shard_spec: str | list[str], max_texts: int | None = None) -> Iterator[str]:
    """Captions (``txt``) plus json paraphrases/negatives from shards; damaged data is skipped."""
    shards = expand_shards(shard_spec) if isinstance(shard_spec, str) else list(shard_spec)
    n = 0
    for shard in shards:
        try:
            for sample in iter_samples(shard):
                texts: list[str] = []
                try:
                    if "txt" in sample:
                        texts.append(sample["txt"].decode("utf-8"))
                    if "json" in sample:
                        meta: Any = json.loads(sample["json"].decode("utf-8"))
                        if isinstance(meta, dict):
                            for field in ("paraphrases", "negatives"):
                                texts.extend(t for t in meta.get(field, []) if isinstance(t, str))
                except (UnicodeDecodeError, ValueError):
                    continue
                for t in texts:
                    yield t
                    n += 1
                    if max_texts is not None and n >= max_texts:
                        return
        except ShardReadError as e:
            warnings.warn(f"tokenizer training: {e}", RuntimeWarning, stacklevel=2)


def train_tokenizer_from_shards(
    shard_spec: str | list[str], out_prefix: str, vocab_size: int = 1024, max_texts: int | None = 2_000_000
) -> str:
    """Train on the captions of a shard spec (see ``expand_shards``); returns the .model path."""
    return train_tokenizer(iter_shard_texts(shard_spec, max_texts), out_prefix, vocab_size)


class Tokenizer:
    """Encode text batches to ``LongTensor[B, context_length]``: ids, eos, then pad."""

    def __init__(self, model_path: str, context_length: int = 64) -> None:
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} not found; make one with: {MAKE_ONE} "
                f"(writes PREFIX.model)"
            )
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.model_path = model_path
        self.context_length = context_length
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.pad_id = int(self._sp.pad_id())
        self.eos_id = int(self._sp.eos_id())
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"tokenizer {model_path!r} has pad_id={self.pad_id}, eos_id={self.eos_id}; "
                f"pad and eos are required (train with: {MAKE_ONE})"
            )
        self.vocab_size = int(self._sp.get_piece_size())

    def __getstate__(self) -> dict[str, Any]:  # picklable for loader worker processes
        return {"model_path": self.model_path, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_path"], state["context_length"])  # type: ignore[misc]

    def encode(self, texts: list[str] | str) -> torch.Tensor:
        """Lower-case, tokenize, append eos, truncate keeping eos last, right-pad with pad_id."""
        if isinstance(texts, str):
            texts = [texts]
        L = self.context_length
        # One thread: sentencepiece's thread pool costs more than it saves on a chunk of
        # captions (~25 us of wall time per text vs ~2 us, benchmarks/RESULTS.md).
        ids = self._sp.encode([" ".join(t.lower().split()) for t in texts], out_type=int, num_threads=1)
        out = np.full((len(texts), L), self.pad_id, dtype=np.int64)  # numpy rows: ~6 us less per text than torch
        for i, seq in enumerate(ids):
            seq = seq[: L - 1] + [self.eos_id]
            out[i, : len(seq)] = seq
        return torch.from_numpy(out)

    def decode(self, tokens: torch.Tensor | list[list[int]] | list[int]) -> list[str]:
        """Token rows back to text, stopping at the first eos and ignoring padding."""
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if rows and isinstance(rows[0], int):
            rows = [rows]
        out = []
        for row in rows:
            ids = []
            for t in row:
                if t == self.eos_id:
                    break
                if t != self.pad_id:
                    ids.append(int(t))
            out.append(self._sp.decode(ids))
        return out
