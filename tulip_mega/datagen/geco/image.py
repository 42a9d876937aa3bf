"""GeCo image stage: instruction-edited positive and negative views (``key.pos.jpg`` / ``key.neg.jpg``).

TULIP's image-image term pulls an image towards a semantically consistent edit of itself
(positive) and pushes it from a semantically altered one (hard negative). Both come from an
instruction image editor (InstructPix2Pix-style diffusion), run offline over the shards:

- the **positive** instruction changes how the photo was taken, never what it shows (lighting,
  weather-free exposure, camera, slight viewpoint), drawn per sample from ``POSITIVE_INSTRUCTIONS``;
- the **negative** instruction comes from a meaning-changing rewrite of the caption: one of the
  GeCo text stage's ``negatives`` when ``key.json`` has them (object, attribute and count edits
  first: what an editor can draw), otherwise a rule edit of the caption (``geco.rules``). The
  word difference between caption and rewrite becomes the instruction ("turn the red circle
  into a green circle"); a rewrite an editor cannot localise (a relation, a long change) becomes
  "make it show <rewrite>". The rewrite is kept in ``key.json`` as the negative's caption.

Why validation is separate (as for text): a diffusion editor sometimes returns a black image
(a safety checker), a flat one, non-finite values, or the input unchanged. An unchanged
"negative" would teach the model to push an image away from itself, so ``check_edit`` drops
it; a "positive" that changed most of the pixels is unlikely to still match the caption and is
dropped too. Every drop is counted by reason and recorded in ``key.json["geco_image"]``.

Every random choice (instruction, diffusion noise) is seeded by (run seed, shard, key, view), so
the output does not depend on batching or worker count. Nothing is downloaded: the pipeline is
a local folder or a name already in the Hugging Face cache.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import io
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
from PIL import Image

from tulip_mega.data.image_files import image_file
from tulip_mega.datagen.geco.rules import OBJECT_GROUPS, edit_caption
from tulip_mega.datagen.geco.run import GecoSummary, Updates, caption_of, encode_meta, meta_of, sample_seed
from tulip_mega.datagen.geco.text import ModelNotFoundError, normalise

__all__ = [
    "POSITIVE_INSTRUCTIONS",
    "DiffusersImageEditor",
    "EditJob",
    "ImageEditSettings",
    "ImageEditor",
    "ImageStage",
    "check_edit",
    "edit_instruction",
    "edit_size",
    "negative_for",
]

# Changes to how the picture was taken, not to what it shows: every caption stays true.
POSITIVE_INSTRUCTIONS: tuple[str, ...] = (
    "make it look like it was photographed on an overcast day",
    "make the lighting softer",
    "make it look like it was taken with a different camera",
    "make it slightly brighter",
    "make it slightly darker",
    "make it look like it was taken from a slightly different angle",
    "make it a sharper, higher quality photo",
)
# Edit kinds an image editor can draw, in order of preference for the negative view.
DRAWABLE_KINDS: tuple[str, ...] = ("object", "attribute", "count")
_STOP = frozenset("a an the one some of on in at under over with and to by near next from into onto is are".split())
_ARTICLES = ("a", "an", "the")
_NOUNS = frozenset(w for group in OBJECT_GROUPS for w in group)
_MAX_SPAN_WORDS = 4  # a longer change is a rewrite, not a local edit


@dataclass(frozen=True)
class ImageEditSettings:
    """Editor call settings and the acceptance limits of ``check_edit``.

    ``resolution`` is the short side the editor sees (sizes rounded to multiples of 64, the
    latent grid of SD-style editors); outputs are resized back to the input's size.
    ``neg_min_change`` / ``pos_max_change`` are mean absolute pixel differences in [0, 1].
    """

    views: tuple[str, ...] = ("pos", "neg")
    steps: int = 20
    guidance: float = 7.5
    image_guidance: float = 1.5
    resolution: int = 512
    jpeg_quality: int = 95
    neg_min_change: float = 0.02
    pos_max_change: float = 0.35
    min_std: float = 0.01
    pos_instructions: tuple[str, ...] = POSITIVE_INSTRUCTIONS

    def __post_init__(self) -> None:
        bad = [v for v in self.views if v not in ("pos", "neg")]
        if bad or not self.views:
            raise ValueError(f"views must be a non-empty subset of ['pos', 'neg'], got {list(self.views)}")
        if self.steps < 1 or self.resolution < 64 or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"need steps >= 1, resolution >= 64 and 1 <= jpeg_quality <= 100, got "
                             f"{self.steps}, {self.resolution}, {self.jpeg_quality}")
        if not self.pos_instructions:
            raise ValueError("pos_instructions is empty")


@dataclass(frozen=True)
class EditJob:
    """One edit to make: the source image (RGB), the instruction, and its own noise seed."""

    image: Image.Image
    instruction: str
    seed: int


class ImageEditor(Protocol):
    """What the image stage needs from an editor (``DiffusersImageEditor``, test doubles)."""

    def edit(self, jobs: Sequence[EditJob]) -> list[tuple[np.ndarray, bool]]:
        """Per job: the edited image as float HxWx3 in [0, 1] at the job image's size, and
        whether the editor flagged it (e.g. a safety checker)."""
        ...

    def metadata(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- instructions


def _words(text: str) -> list[str]:
    return normalise(text).split()


def edit_instruction(caption: str, rewrite: str) -> Optional[str]:
    """An editing instruction that turns an image of ``caption`` into one of ``rewrite``.

    The changed words (with one neighbouring content word each side, so "red" -> "green" reads
    "turn the red circle into a green circle") become a replace / add / remove instruction; a
    change of only function words (a relation: on -> under) or of more than a few words becomes
    "make it show <rewrite>". None when the two say the same words.
    """
    a, b = _words(caption), _words(rewrite)
    ops = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if not ops:
        return None
    i1, i2, j1, j2 = ops[0][1], ops[-1][2], ops[0][3], ops[-1][4]
    changed = a[i1:i2] + b[j1:j2]
    if all(w in _STOP for w in changed) or max(i2 - i1, j2 - j1) > _MAX_SPAN_WORDS:
        return f"make it show {' '.join(b)}"
    if i1 == i2:  # only words added
        added = [w for w in b[j1:j2] if w not in ("with", "and")] or b[j1:j2]
        return f"add {' '.join(added)}"
    # Context so the editor knows what to change (neighbours are equal in both texts): the
    # content word before ("red circle" -> "red square"), and the word after unless the change
    # already ends in a noun ("red" -> "green" reads "red circle" -> "green circle").
    if i1 > 0 and a[i1 - 1] not in _STOP:
        i1, j1 = i1 - 1, j1 - 1
    if i2 < len(a) and a[i2] not in _STOP and a[i2 - 1] not in _NOUNS and not a[i2].endswith("ing"):
        i2, j2 = i2 + 1, j2 + 1
    old, new = a[i1:i2], b[j1:j2]
    if old[0] in _ARTICLES + ("one",):
        old = old[1:]
    if not new:
        return f"remove the {' '.join(old)}"
    if new[0] not in _ARTICLES and not new[-1].endswith("s"):  # a singular noun phrase gets its article
        new = ["an" if new[0][0] in "aeiou" else "a"] + new
    return f"turn the {' '.join(old)} into {' '.join(new)}"


def negative_for(caption: str, meta: dict[str, Any], rng: random.Random) -> Optional[tuple[str, str, str]]:
    """(rewritten caption, its kind, where it came from) for the negative view, or None.

    Prefers the GeCo text stage's negatives of a drawable kind, then a rule edit of a drawable
    kind, then any text-stage negative (drawn as "make it show ...").
    """
    negatives = [n for n in meta.get("negatives", []) if isinstance(n, str) and n.strip()]
    kinds = meta.get("negative_kinds")
    kinds = kinds if isinstance(kinds, list) and len(kinds) == len(meta.get("negatives", [])) else None
    tagged = list(zip(negatives, kinds if kinds else ["unknown"] * len(negatives)))
    drawable = [(n, k) for n, k in tagged if k in DRAWABLE_KINDS and normalise(n) != normalise(caption)]
    if drawable:
        n, k = rng.choice(drawable)
        return n, k, "geco_text"
    for kind in rng.sample(DRAWABLE_KINDS, len(DRAWABLE_KINDS)):
        edited = edit_caption(caption, kind, rng)
        if edited and normalise(edited) != normalise(caption):
            return edited, kind, "rules"
    rest = [(n, k) for n, k in tagged if normalise(n) != normalise(caption)]
    if rest:
        n, k = rng.choice(rest)
        return n, k, "geco_text"
    return None


# --------------------------------------------------------------------------- images


def edit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) the editor works at: short side ~``resolution``, multiples of 64."""
    scale = resolution / min(width, height)
    return tuple(max(64, int(round(d * scale / 64)) * 64) for d in (width, height))  # type: ignore[return-value]


def check_edit(source: np.ndarray, edited: np.ndarray, view: str, settings: ImageEditSettings) -> Optional[str]:
    """Why ``edited`` (float HxWx3 in [0, 1], same size as ``source``) is rejected, or None."""
    if edited.shape != source.shape:
        return "wrong_size"
    if not np.isfinite(edited).all():
        return "non_finite"
    if float(edited.std()) < settings.min_std:
        return "blank"
    change = float(np.abs(edited.astype(np.float64) - source.astype(np.float64)).mean())
    if view == "neg" and change < settings.neg_min_change:
        return "unchanged"
    if view == "pos" and change > settings.pos_max_change:
        return "too_different"
    return None


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _jpeg(pixels: np.ndarray, size: tuple[int, int], quality: int) -> bytes:
    """``pixels`` (float [0, 1]) as a JPEG at ``size`` (the input image's (width, height))."""
    im = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")
    if im.size != size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- diffusers editor


def _load_pipeline(model: str, device: str, dtype: str) -> Any:
    """A diffusers pipeline from a local folder or the HF cache only; clear errors otherwise."""
    try:
        import torch
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise ImportError(f"geco image needs diffusers: pip install diffusers (or the [geco] extra); {e}") from e
    if dtype == "auto":
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    elif isinstance(getattr(torch, dtype, None), torch.dtype):
        torch_dtype = getattr(torch, dtype)
    else:
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype (auto, float16, bfloat16, float32)")
    where = "folder" if os.path.isdir(model) else "Hugging Face cache entry"
    try:
        pipe = DiffusionPipeline.from_pretrained(
            model, local_files_only=True, torch_dtype=torch_dtype,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,  # else diffusers warns
        )
    except (OSError, ValueError, TypeError) as e:
        raise ModelNotFoundError(
            f"GeCo image model {model!r} could not be loaded from a local {where} (nothing is downloaded "
            f"at run time): give --model a folder holding a diffusers instruction-editing pipeline "
            f"(model_index.json and its components, e.g. a saved timbrooks/instruct-pix2pix), or a "
            f"pipeline name already in the Hugging Face cache (HF_HOME="
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}). "
            f"Cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    params = inspect.signature(pipe.__call__).parameters
    if "image" not in params or "prompt" not in params:
        raise ValueError(
            f"GeCo image model {model!r} is a {type(pipe).__name__}, which takes no (prompt, image) pair; "
            f"geco image needs an instruction-editing pipeline such as StableDiffusionInstructPix2PixPipeline"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class DiffusersImageEditor:
    """Batched instruction edits with a diffusers pipeline (InstructPix2Pix and the like).

    Jobs are grouped by image size (a batch needs one size) and cut into ``batch_size`` calls.
    Each job has its own CPU ``torch.Generator``, so its noise, and hence its output on given
    hardware, does not depend on which other jobs share its batch.
    """

    method = "diffusion"

    def __init__(self, model: str, settings: ImageEditSettings = ImageEditSettings(), device: str = "cpu",
                 dtype: str = "auto", batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = model
        self.settings = settings
        self.batch_size = batch_size
        self.pipe = _load_pipeline(model, device, dtype)
        self._params = set(inspect.signature(self.pipe.__call__).parameters)

    def _call(self, jobs: Sequence[EditJob]) -> list[tuple[np.ndarray, bool]]:
        import torch

        s = self.settings
        kwargs: dict[str, Any] = {
            "prompt": [j.instruction for j in jobs], "image": [j.image for j in jobs],
            "num_inference_steps": s.steps, "generator": [torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
            "output_type": "np",
        }
        for name, value in (("guidance_scale", s.guidance), ("image_guidance_scale", s.image_guidance)):
            if name in self._params:
                kwargs[name] = value
        with torch.no_grad():
            out = self.pipe(**kwargs)
        images = np.asarray(out.images, dtype=np.float32)
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(jobs)
        return [(images[i], bool(flags[i])) for i in range(len(jobs))]

    def edit(self, jobs: Sequence[EditJob]) -> list[tuple[np.ndarray, bool]]:
        results: list[Optional[tuple[np.ndarray, bool]]] = [None] * len(jobs)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, j in enumerate(jobs):
            by_size.setdefault(j.image.size, []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.batch_size):
                part = idx[k : k + self.batch_size]
                for i, r in zip(part, self._call([jobs[i] for i in part]), strict=True):
                    results[i] = r
        return results  # type: ignore[return-value]

    def metadata(self) -> dict[str, Any]:
        """What ``key.json["geco_image"]`` records about this editor."""
        s = self.settings
        return {"method": self.method, "model": self.name, "pipeline": type(self.pipe).__name__, "steps": s.steps,
                "guidance": s.guidance, "image_guidance": s.image_guidance, "resolution": s.resolution}


# --------------------------------------------------------------------------- the stage


class ImageStage:
    """Writes ``key.pos.jpg`` / ``key.neg.jpg`` and ``key.json["geco_image"]`` (``geco image``).

    Any edit already in the input is replaced; one rejected or not made is removed (a loader
    treats a missing edit as absent, never as stale data from another generator).
    """

    name = "image"

    def __init__(self, editor: ImageEditor, settings: Optional[ImageEditSettings] = None) -> None:
        self.editor = editor
        # one settings object for both sides by default: the editor records what the stage used
        self.settings = settings or getattr(editor, "settings", None) or ImageEditSettings()
        self.run_seed = 0
        self.shard_seed = 0

    def start_shard(self, run_seed: int, shard_seed: int) -> None:
        self.run_seed, self.shard_seed = run_seed, shard_seed

    def _plan(self, sample: dict[str, Any], caption: Optional[str], meta: dict[str, Any],
              image: Image.Image) -> tuple[dict[str, Any], list[tuple[str, EditJob]]]:
        """The JSON record and the edit jobs of one sample."""
        key = sample["__key__"]
        rng = random.Random(sample_seed(self.shard_seed, key, "instructions"))
        record: dict[str, Any] = {**self.editor.metadata(), "seed": self.run_seed}
        jobs: list[tuple[str, EditJob]] = []
        if "pos" in self.settings.views:
            record["pos_instruction"] = rng.choice(self.settings.pos_instructions)
            jobs.append(("pos", EditJob(image, record["pos_instruction"], sample_seed(self.shard_seed, key, "pos"))))
        if "neg" in self.settings.views:
            negative = negative_for(caption, meta, rng) if caption else None
            instruction = edit_instruction(caption, negative[0]) if caption and negative else None
            if negative and instruction:
                record.update(neg_caption=negative[0], neg_kind=negative[1], neg_source=negative[2],
                              neg_instruction=instruction)
                jobs.append(("neg", EditJob(image, instruction, sample_seed(self.shard_seed, key, "neg"))))
            else:
                record["neg_dropped"] = "no_caption" if not caption else "no_edit"
        return record, jobs

    def process(self, batch: Sequence[dict[str, Any]], summary: GecoSummary) -> list[Updates]:
        updates: list[Updates] = [{} for _ in batch]
        planned = []  # (index, original size, source pixels at edit size, old json, record, [(view, job)])
        for i, s in enumerate(batch):
            meta = meta_of(s)
            try:
                with Image.open(io.BytesIO(s[image_file(s)])) as im:
                    original = im.convert("RGB")
            except Exception:  # noqa: BLE001 - any undecodable image: copy the sample unchanged
                original = None
            if original is None or meta is None:
                summary.unchanged += 1  # the loaders judge it
                continue
            image = original.resize(edit_size(*original.size, self.settings.resolution), Image.Resampling.BICUBIC)
            record, jobs = self._plan(s, caption_of(s), meta, image)
            if "neg_dropped" in record:
                summary.dropped[f"neg_{record['neg_dropped']}"] += 1
            planned.append((i, original.size, _to_array(image), meta, record, jobs))
        all_jobs = [job for *_, jobs in planned for _, job in jobs]
        results = iter(self.editor.edit(all_jobs))
        for i, size, source, meta, record, jobs in planned:
            for view in self.settings.views:
                updates[i][f"{view}.jpg"] = None  # removed unless made below
            for view, _ in jobs:
                pixels, flagged = next(results)
                reason = "flagged" if flagged else check_edit(source, pixels, view, self.settings)
                if reason is None:
                    updates[i][f"{view}.jpg"] = _jpeg(pixels, size, self.settings.jpeg_quality)
                    summary.made[f"{view}_images"] += 1
                else:
                    record[f"{view}_dropped"] = reason
                    summary.dropped[f"{view}_{reason}"] += 1
            updates[i]["json"] = encode_meta({**meta, "geco_image": record})
        return updates
