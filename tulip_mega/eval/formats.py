"""Readers for the eval set formats users already have, split over data-parallel ranks.

Formats (`eval.zeroshot_format` / `eval.retrieval_format`, `tulip-mega eval --format`):

- `classes_json`: this project's shards + a classes.json (tulip_mega/eval/zeroshot.py); read by
  the runner's own loader, not here.
- `clip_benchmark`: CLIP_benchmark's webdataset layout (its `build_wds_dataset`):
  `<root>/<split>/{0..N-1}.tar` with N in `<root>/<split>/nshards.txt`; `<root>/classnames.txt`
  (one name per line) and `<root>/zeroshot_classification_templates.txt` (one template per
  line, `{c}` for the class name) for classification; `<root>/dataset_type.txt` = `retrieval`
  for retrieval sets. A sample's image is its first of `.webp`, `.png`, `.jpg`, `.jpeg`; a
  classification sample has `.cls` (the class index as text), a retrieval sample `.txt`
  (one caption per line).
- `imagefolder`: torchvision's ImageFolder tree, `<root>/<class>/<image>`: the classes are the
  sub-folder names, sorted, indexed from 0; images are files with an image extension.
- `imagenet`: an ImageFolder tree of the 1000 ImageNet-1k WordNet-id folders (`n01440764`, ...;
  sorted order is the standard class index) named by the standard class names shipped in
  tulip_mega/eval/data (see its README for the sources).

Templates (`eval.zeroshot_templates`): `openai` (the CLIP paper's 80), `siglip` (big_vision's,
with SigLIP's canonicalised class names for `imagenet`), or a file of templates with `{c}`;
null = the set's own (clip_benchmark's templates file; `openai` for imagefolder / imagenet).
Prompts are `template.format(c=name)`, as in CLIP_benchmark.

Images are decoded like every other eval set here (tulip_mega/data/simple_loader.py `decode_image`:
PIL, RGB, bicubic squash resize to the model's square size, no crop; then (x / 255 - 0.5) / 0.5),
which is what the open_clip export's preprocess_cfg asks open_clip for.

Every sample carries a `uid`, unique in the set and the same under every layout (shard index
and position for tar sets, the file's index in sorted order for folders), so results gathered
over DP ranks can be matched up (retrieval captions to their image) whatever the order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from tulip_mega.data.shards import iter_samples

if TYPE_CHECKING:
    import torch
from tulip_mega.config import ConfigError

ZEROSHOT_FORMATS = ("classes_json", "clip_benchmark", "imagefolder", "imagenet")
RETRIEVAL_FORMATS = ("pairs", "clip_benchmark")
TEMPLATE_SETS = ("openai", "siglip")
IMAGE_FIELDS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
DATA = Path(__file__).resolve().parent / "data"
_UID_STRIDE = 1 << 32  # uid = shard index * stride + position in the shard


@dataclass(frozen=True)
class Item:
    """One eval sample: encoded image bytes, its class (-1: none) and captions (retrieval)."""

    uid: int
    key: str
    image: bytes
    label: int = -1
    captions: tuple[str, ...] = ()


def read_lines(path: Path) -> list[str]:
    """Lines of a text file, stripped (CLIP_benchmark's reading of its metadata files)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def shipped(name: str) -> list[str]:
    """A list shipped in tulip_mega/eval/data (class names or templates)."""
    return read_lines(DATA / name)


def resolve_templates(spec: Optional[str], default: Optional[list[str]], where: str) -> list[str]:
    """`openai` / `siglip` / a file of templates / None (the set's own `default`)."""
    if spec is None:
        if default is None:
            raise ConfigError(f"{where}: the set has no templates of its own; set eval.zeroshot_templates "
                              f"(one of {', '.join(TEMPLATE_SETS)} or a file with one '{{c}}' template per line)")
        templates = default
    elif spec == "{c}":  # the class name alone (linear probes: prompts unused)
        templates = [spec]
    elif spec in TEMPLATE_SETS:
        templates = shipped(f"{spec}_imagenet_templates.txt")
    else:
        if not Path(spec).is_file():
            raise ConfigError(f"eval.zeroshot_templates={spec!r} is neither one of {', '.join(TEMPLATE_SETS)} nor "
                              "a file (one template per line, '{c}' where the class name goes)")
        templates = read_lines(Path(spec))
    templates = [t for t in templates if t]
    bad = [t for t in templates if "{c}" not in t]
    if not templates or bad:
        raise ConfigError(f"{where}: templates must be non-empty and each hold '{{c}}' (got {bad[:2] or templates})")
    return templates


def prompts_of(names: list[str], templates: list[str]) -> list[list[str]]:
    """Every class's prompts: template.format(c=name)."""
    return [[t.format(c=name) for t in templates] for name in names]


# --- CLIP_benchmark webdataset layout ------------------------------------------------------------
def wds_shards(root: Path, split: str) -> list[str]:
    """`<root>/<split>/{0..N-1}.tar` with N from nshards.txt; errors say what was expected."""
    count_file = root / split / "nshards.txt"
    if not count_file.is_file():
        raise FileNotFoundError(f"{count_file} does not exist: a CLIP_benchmark webdataset set is "
                                f"<root>/<split>/nshards.txt + <root>/<split>/0.tar ... (root {root}, split {split!r})")
    try:
        n = int(count_file.read_text().strip())
    except ValueError:
        raise ValueError(f"{count_file} must hold the number of shards, got {count_file.read_text()[:40]!r}") from None
    shards = [str(root / split / f"{i}.tar") for i in range(n)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if n < 1 or missing:
        raise FileNotFoundError(f"{count_file} says {n} shards but {missing[:3] or 'none'} are missing")
    return shards


def dataset_type(root: Path) -> str:
    """`classification` unless <root>/dataset_type.txt says otherwise (CLIP_benchmark's default)."""
    path = root / "dataset_type.txt"
    return path.read_text().strip().lower() if path.is_file() else "classification"


def _rank_shards(shards: list[str], dp_rank: int, dp_size: int) -> tuple[list[tuple[int, str]], bool]:
    """This rank's (index, shard) pairs, and whether samples (not shards) are split."""
    indexed = list(enumerate(shards))
    if len(shards) >= dp_size:
        return indexed[dp_rank::dp_size], False
    return indexed, True


def wds_items(shards: list[str], dp_rank: int, dp_size: int, retrieval: bool) -> Iterator[Item]:
    """This DP rank's samples of CLIP_benchmark shards (disjoint over ranks, together all)."""
    mine, per_sample = _rank_shards(shards, dp_rank, dp_size)
    count = 0
    for index, shard in mine:
        for pos, sample in enumerate(iter_samples(shard)):
            if per_sample:
                count += 1
                if (count - 1) % dp_size != dp_rank:
                    continue
            yield _wds_item(sample, index * _UID_STRIDE + pos, shard, retrieval)


def _wds_item(sample: dict, uid: int, shard: str, retrieval: bool) -> Item:
    key = sample["__key__"]
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"sample {key!r} in {shard} has no image (.webp, .png, .jpg or .jpeg); it has "
                         f"{sorted(k for k in sample if not k.startswith('__'))}")
    if retrieval:
        if "txt" not in sample:
            raise ValueError(f"retrieval sample {key!r} in {shard} has no .txt (one caption per line)")
        captions = tuple(c for c in sample["txt"].decode("utf-8").splitlines() if c.strip())
        if not captions:
            raise ValueError(f"retrieval sample {key!r} in {shard} has an empty .txt")
        return Item(uid, key, sample[field], captions=captions)
    if "cls" not in sample:
        raise ValueError(f"classification sample {key!r} in {shard} has no .cls (the class index as text)")
    return Item(uid, key, sample[field], label=int(sample["cls"].decode().strip()))


# --- ImageFolder trees -----------------------------------------------------------------------------
def folder_classes(root: Path) -> list[str]:
    """The class folders of an ImageFolder tree, sorted (torchvision's find_classes)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: an ImageFolder set is <root>/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class folders: an ImageFolder set is <root>/<class>/<image>")
    return classes


def folder_files(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, class index) of every image, in torchvision's order (by class, then sorted path)."""
    files = []
    for index, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(root / name, followlinks=True)):
            files.extend((os.path.join(dirpath, f), index) for f in sorted(names)
                         if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) under its class folders")
    return files


def folder_items(files: list[tuple[str, int]], dp_rank: int, dp_size: int) -> Iterator[Item]:
    for uid in range(dp_rank, len(files), dp_size):
        path, label = files[uid]
        yield Item(uid, path, Path(path).read_bytes(), label=label)


# --- sets ----------------------------------------------------------------------------------------
@dataclass
class ClassificationSet:
    """Class names, prompts per class, and a per-rank sample reader."""

    names: list[str]
    prompts: list[list[str]]
    source: str
    _shards: Optional[list[str]] = None
    _files: Optional[list[tuple[str, int]]] = None

    def __len__(self) -> int:
        return len(self.names)

    def items(self, dp_rank: int, dp_size: int) -> Iterator[Item]:
        """This DP rank's samples; labels checked against the class count."""
        it = (wds_items(self._shards, dp_rank, dp_size, retrieval=False) if self._shards is not None
              else folder_items(self._files, dp_rank, dp_size))
        for item in it:
            if not 0 <= item.label < len(self.names):
                raise ValueError(f"{self.source}: sample {item.key!r} has class {item.label}, outside "
                                 f"0..{len(self.names) - 1} (the {len(self.names)} class names)")
            yield item


def load_classification(fmt: str, path: str, split: str = "test", templates: Optional[str] = None,
                        prompts: bool = True) -> ClassificationSet:
    """A zero-shot set in `fmt` (see the module doc) at `path`; `prompts=False` (linear probes)
    skips the templates."""
    root = Path(path)
    where = f"{fmt} set {root}"
    if not prompts:
        templates = "{c}"
    if fmt == "clip_benchmark":
        shards = wds_shards(root, split)
        kind = dataset_type(root)
        if kind != "classification":
            raise ConfigError(f"{root}/dataset_type.txt says {kind!r}: not a classification set")
        names_file = root / "classnames.txt"
        if not names_file.is_file():
            raise FileNotFoundError(f"{names_file} does not exist (CLIP_benchmark: one class name per line, in "
                                    "class-index order)")
        own = root / "zeroshot_classification_templates.txt"
        names = read_lines(names_file)
        tmpl = resolve_templates(templates, read_lines(own) if own.is_file() else None, where)
        return ClassificationSet(names, prompts_of(names, tmpl), where, _shards=shards)
    if fmt == "imagefolder":
        classes = folder_classes(root)
        tmpl = resolve_templates(templates or "openai", None, where)
        return ClassificationSet(classes, prompts_of(classes, tmpl), where, _files=folder_files(root, classes))
    if fmt == "imagenet":
        classes = folder_classes(root)
        if len(classes) != 1000:
            raise ValueError(f"{root}: ImageNet-1k needs the 1000 WordNet-id class folders (n01440764, ...), "
                             f"found {len(classes)} folders ({classes[:3]})")
        names = shipped("siglip_imagenet_classnames.txt" if templates == "siglip" else "imagenet_classnames.txt")
        tmpl = resolve_templates(templates or "openai", None, where)
        return ClassificationSet(names, prompts_of(names, tmpl), where, _files=folder_files(root, classes))
    raise ConfigError(f"eval.zeroshot_format={fmt!r}: expected one of {', '.join(ZEROSHOT_FORMATS)}")


@dataclass
class RetrievalSet:
    """A CLIP_benchmark retrieval set: images with one or more captions each."""

    shards: list[str]
    source: str

    def items(self, dp_rank: int, dp_size: int) -> Iterator[Item]:
        return wds_items(self.shards, dp_rank, dp_size, retrieval=True)


def load_retrieval(path: str, split: str = "test") -> RetrievalSet:
    """A CLIP_benchmark retrieval set (dataset_type.txt = retrieval) at `path`."""
    root = Path(path)
    shards = wds_shards(root, split)
    kind = dataset_type(root)
    if kind != "retrieval":
        raise ConfigError(f"{root}/dataset_type.txt must say 'retrieval' for a CLIP_benchmark retrieval set "
                          f"(found {kind!r})")
    return RetrievalSet(shards, f"clip_benchmark retrieval set {root}")


# --- MMVP-VLM ----------------------------------------------------------------------------------
MMVP_IMAGE_DIRS = ("MMVP_VLM_Images", "MLLM_VLM Images")  # the README's name, the scoring script's
MMVP_PROMPT = "a photo of "  # the scoring script's prefix to every statement


@dataclass(frozen=True)
class MMVPSet:
    """MMVP-VLM (github.com/tsb0601/MMVP, scripts/evaluate_vlm.py): Questions.csv rows
    (qid, pattern, statement) taken two at a time as a pair; both images of a pair are
    `<images>/<pattern of the first row>/<qid>.jpg`."""

    pairs: list[tuple[str, tuple[int, str], tuple[int, str]]]  # (pattern, (qid1, s1), (qid2, s2))
    image_dir: Path

    @property
    def patterns(self) -> list[str]:
        """The visual patterns, in the order the CSV first names them."""
        return list(dict.fromkeys(p for p, _, _ in self.pairs))

    def questions(self) -> list[tuple[int, str, Path]]:
        """(qid, prompt, image path) of every row."""
        return [(q, MMVP_PROMPT + s, self.image_dir / pattern / f"{q}.jpg")
                for pattern, *rows in self.pairs for q, s in rows]


def load_mmvp(path: str) -> MMVPSet:
    """The released MMVP-VLM folder: Questions.csv + the image folder (see MMVP_IMAGE_DIRS)."""
    import csv

    root = Path(path)
    csv_file = root / "Questions.csv"
    image_dir = next((root / d for d in MMVP_IMAGE_DIRS if (root / d).is_dir()), None)
    if not csv_file.is_file() or image_dir is None:
        raise FileNotFoundError(f"{root} is not an MMVP-VLM folder: expected Questions.csv and an image folder "
                                f"({' or '.join(MMVP_IMAGE_DIRS)}) holding <pattern>/<qid>.jpg")
    with open(csv_file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]  # header skipped, as the scoring script does
    rows = [r for r in rows if r]
    if len(rows) % 2 or any(len(r) < 3 for r in rows):
        raise ValueError(f"{csv_file}: expected rows of (qid, pattern, statement) in pairs, got {len(rows)} rows")
    pairs = [(a[1], (int(a[0]), a[2]), (int(b[0]), b[2])) for a, b in zip(rows[::2], rows[1::2])]
    mmvp = MMVPSet(pairs, image_dir)
    missing = [str(p) for _, _, p in mmvp.questions() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MMVP-VLM images missing ({len(missing)}), e.g. {missing[:2]}")
    return mmvp


def mmvp_scores(mmvp: MMVPSet, image_emb: dict[int, "torch.Tensor"], text_emb: dict[int, "torch.Tensor"]
                ) -> dict[str, float]:
    """The scoring script's rule: statement q's prediction is img1 when its similarity to img1 is
    higher than to img2 (softmax over the two images > 0.5), the truth is img1 when q is odd; a
    pair counts when both statements are right. Per pattern: the fraction of its pairs right;
    `average`: the mean over patterns (the number the MMVP paper plots); `pairs`: how many."""
    right: dict[str, list[bool]] = {p: [] for p in mmvp.patterns}
    for pattern, (q1, _), (q2, _) in mmvp.pairs:
        ok = True
        for q in (q1, q2):
            img1_wins = float(image_emb[q1] @ text_emb[q]) > float(image_emb[q2] @ text_emb[q])
            ok &= img1_wins == (q % 2 == 1)
        right[pattern].append(ok)
    per = {p: sum(v) / len(v) for p, v in right.items()}
    return {**{mmvp_metric(p): v for p, v in per.items()}, "average": sum(per.values()) / len(per),
            "pairs": float(len(mmvp.pairs))}


def mmvp_metric(pattern: str) -> str:
    """A pattern's metric name: lower case, runs of other characters as '_'."""
    import re

    return "pattern_" + re.sub(r"[^a-z0-9]+", "_", pattern.lower()).strip("_")
