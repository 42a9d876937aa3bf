"""GeCo text: prompts, batched LLM generation, and parsing / validation of what comes back.

Why validation is separate from generation: an instruction LLM (let alone a small one) often
answers with an echo of the caption, an empty line, a list, a chatty preamble or a runaway
paragraph. Every generator (the LLM here, the word rules in ``rules``) hands back raw strings
and ``validate_texts`` alone decides what reaches ``key.json``, so the guarantees hold whatever
produced the text: no empty or over-long text, no duplicates, no paraphrase equal to the
caption, and never a "negative" identical to the original caption (which would teach the
model to push a caption away from its own image).

Nothing here downloads: the model is a local folder or a name already in the Hugging Face
cache (``local_files_only=True``); otherwise ``ModelNotFoundError`` says what to provide.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "EDIT_KINDS",
    "EDIT_PROMPTS",
    "PARAPHRASE_PROMPTS",
    "GecoTexts",
    "GenerationSettings",
    "LLMTextGenerator",
    "ModelNotFoundError",
    "build_prompts",
    "normalise",
    "parse_output",
    "validate_texts",
]

EDIT_KINDS: tuple[str, ...] = ("object", "attribute", "count", "relation")

_RULES = (
    "Answer with the new caption only, on one line, with no explanation. "
    "Keep it about as long as the original."
)
# Several paraphrase instructions, so greedy decoding still yields distinct paraphrases.
PARAPHRASE_PROMPTS: tuple[str, ...] = (
    "Paraphrase this image caption: same meaning, different words. " + _RULES,
    "Rewrite this image caption with a different sentence structure but exactly the same content. " + _RULES,
    "Describe the same image as this caption in other words, keeping every object, colour, "
    "count and position. " + _RULES,
)
EDIT_PROMPTS: dict[str, str] = {
    "object": "Change ONE object in this image caption into a different, plausible object; "
              "keep everything else. " + _RULES,
    "attribute": "Change ONE attribute (a colour, size, material or state) in this image caption; "
                 "keep everything else. " + _RULES,
    "count": "Change the NUMBER of one kind of object in this image caption (e.g. one -> two); "
             "keep everything else. " + _RULES,
    "relation": "Change the spatial relation or action between two things in this image caption "
                "(e.g. on -> under, left -> right); keep everything else. " + _RULES,
}

# Leading labels and list markers an instruction model likes to add ("Paraphrase: ...", "1. ").
_PREFIX = re.compile(
    r"^\s*(?:(?:new |edited |rewritten |modified )?(?:caption|paraphrase|answer|output|rewrite|rewritten|"
    r"edit|edited caption)\s*[:\-]\s*|[-*\u2022]\s+|\(?\d{1,2}[.)]\s+)",
    re.IGNORECASE,
)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


class ModelNotFoundError(FileNotFoundError):
    """The LLM is neither a local folder nor cached; the message says what to provide."""


@dataclass(frozen=True)
class GenerationSettings:
    """How many texts to ask for and the limits applied to what comes back.

    ``max_words`` bounds a kept text absolutely; ``max_ratio`` relative to the caption (a text
    longer than ``max_ratio * words(caption) + 8`` words is a runaway, not a rewrite).
    ``temperature`` 0 means greedy decoding; otherwise sampling from the per-shard torch seed.
    """

    num_paraphrases: int = 2
    edit_kinds: tuple[str, ...] = EDIT_KINDS
    max_new_tokens: int = 64
    max_words: int = 64
    max_ratio: float = 2.5
    temperature: float = 0.7
    top_p: float = 0.9

    def __post_init__(self) -> None:
        unknown = [k for k in self.edit_kinds if k not in EDIT_PROMPTS]
        if unknown:
            raise ValueError(f"unknown GeCo edit kinds {unknown}; expected a subset of {list(EDIT_KINDS)}")
        if self.num_paraphrases < 0 or self.max_new_tokens < 1 or self.max_words < 1:
            raise ValueError("num_paraphrases must be >= 0, max_new_tokens and max_words >= 1")


@dataclass
class GecoTexts:
    """The kept texts of one caption, with the kind of each negative and what was dropped."""

    paraphrases: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    negative_kinds: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def normalise(text: str) -> str:
    """Comparison form: lower case, single spaces, no surrounding punctuation or quotes."""
    return " ".join(text.lower().split()).strip(" .,;:!?" + _QUOTES)


def parse_output(raw: str) -> str:
    """The caption inside one raw model answer ("" when there is none).

    Keeps the first non-empty line, then strips a leading label ("Paraphrase:", "Caption -"),
    a list marker ("1.", "-") and surrounding quotes.
    """
    for line in raw.replace("\r", "\n").split("\n"):
        line = line.strip()
        if not line:
            continue
        for _ in range(2):  # e.g. "1. Caption: ..."
            line = _PREFIX.sub("", line, count=1).strip()
        return " ".join(line.strip(_QUOTES).split())
    return ""


def _too_long(text: str, caption: str, settings: GenerationSettings) -> bool:
    words = len(text.split())
    return words > settings.max_words or words > settings.max_ratio * len(caption.split()) + 8


def validate_texts(
    caption: str,
    paraphrases: Sequence[str],
    negatives: Sequence[str],
    negative_kinds: Optional[Sequence[str]] = None,
    settings: GenerationSettings = GenerationSettings(),
) -> GecoTexts:
    """Parse and filter raw generations of one caption into what ``key.json`` may hold.

    Dropped (and counted under that reason): empty after parsing; over-long; identical to the
    caption (``same_as_caption``: a paraphrase that changes nothing, or a negative that is not
    one); a duplicate of an earlier kept text (paraphrases are kept first, so a "negative" equal
    to a paraphrase is dropped too). Comparison is on ``normalise``d text.
    """
    kinds = list(negative_kinds) if negative_kinds is not None else [""] * len(negatives)
    if len(kinds) != len(negatives):
        raise ValueError(f"{len(negatives)} negatives but {len(kinds)} negative kinds")
    out = GecoTexts()
    seen = {normalise(caption)}
    for target, kind_list, items in (
        (out.paraphrases, None, [(t, "") for t in paraphrases]),
        (out.negatives, out.negative_kinds, list(zip(negatives, kinds))),
    ):
        for raw, kind in items:
            text = parse_output(raw)
            key = normalise(text)
            if not key:
                out.dropped["empty"] += 1
            elif _too_long(text, caption, settings):
                out.dropped["too_long"] += 1
            elif key == normalise(caption):
                out.dropped["same_as_caption"] += 1
            elif key in seen:
                out.dropped["duplicate"] += 1
            else:
                seen.add(key)
                target.append(text)
                if kind_list is not None:
                    kind_list.append(kind)
    return out


def build_prompts(caption: str, settings: GenerationSettings) -> tuple[list[str], list[str]]:
    """(instructions, kinds) for one caption: paraphrases first (kind ""), then one per edit kind."""
    prompts, kinds = [], []
    for i in range(settings.num_paraphrases):
        prompts.append(f"{PARAPHRASE_PROMPTS[i % len(PARAPHRASE_PROMPTS)]}\nCaption: {caption}")
        kinds.append("")
    for kind in settings.edit_kinds:
        prompts.append(f"{EDIT_PROMPTS[kind]}\nCaption: {caption}")
        kinds.append(kind)
    return prompts, kinds


def _load(model: str, device: str, dtype: str) -> tuple[Any, Any]:
    """Tokenizer and model from a local folder or the HF cache only; clear error otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = "folder" if os.path.isdir(model) else "Hugging Face cache entry"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(
            model, local_files_only=True, dtype=getattr(torch, dtype) if dtype != "auto" else "auto"
        )
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"GeCo text model {model!r} could not be loaded from a local {where} (nothing is downloaded "
            f"at run time): give --model a folder holding a transformers causal LM (config.json, weights, "
            f"tokenizer files), or a model name already in the Hugging Face cache (HF_HOME="
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}), or --model eda for the rule-based "
            f"fallback. Cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    tokenizer.padding_side = "left"  # new tokens start at the same column for every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.to(device).eval()
    return tokenizer, lm


class LLMTextGenerator:
    """Paraphrases and meaning-changing edits from a causal LM, batched over prompts.

    The torch RNG is the only randomness (seeded per shard by ``run``), and prompts are built
    and batched in sample order, so a shard's output is a function of (model, seed, shard) on
    given hardware (greedy decoding with ``temperature=0`` removes even the sampling).
    """

    method = "llm"

    def __init__(
        self,
        model: str,
        settings: GenerationSettings = GenerationSettings(),
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = model
        self.settings = settings
        self.device = device
        self.batch_size = batch_size
        self.tokenizer, self.model = _load(model, device, dtype)

    def start_shard(self, shard_seed: int) -> None:
        """Seed torch's RNG (CPU and every GPU) for the shard about to be generated."""
        import torch

        torch.manual_seed(shard_seed)

    def _format(self, instruction: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
        return f"{instruction}\nAnswer:"

    def _complete(self, prompts: list[str]) -> list[str]:
        import torch

        s = self.settings
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(prompts[i : i + self.batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p} if s.temperature > 0 \
                else {"do_sample": False}
            with torch.no_grad():
                ids = self.model.generate(
                    **enc, max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
                )
            out += self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    def generate(self, captions: Sequence[str], keys: Sequence[str]) -> list[GecoTexts]:
        """Validated texts for each caption (``keys`` are unused here; the rules use them)."""
        kinds = build_prompts("", self.settings)[1]
        per = len(kinds)
        prompts = [self._format(p) for c in captions for p in build_prompts(c, self.settings)[0]]
        answers = self._complete(prompts)
        n = self.settings.num_paraphrases
        results = []
        for j, caption in enumerate(captions):
            mine = answers[j * per : (j + 1) * per]
            results.append(validate_texts(caption, mine[:n], mine[n:], kinds[n:], self.settings))
        return results

    def metadata(self) -> dict[str, Any]:
        """What ``key.json["geco_text"]`` records about this generator."""
        return {"method": self.method, "model": self.name, "temperature": self.settings.temperature}
