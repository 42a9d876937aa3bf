"""Zero-shot, retrieval and linear-probe evaluation of a model as laid out for training.

`Evaluator(cfg, parts).run()` evaluates the recipe's eval sets (eval.zeroshot_shards,
eval.retrieval_shards, eval.linear_probe_shards, eval.mmvp_path; in this project's shard format
or the standard ones read by tulip_mega/eval/formats.py, per eval.*_format) with the model as
laid out for training (any TP x PP x DP); every
rank returns the same metrics, keyed `eval/zeroshot/top1`, `eval/retrieval/image_to_text_r1`,
... The trainer calls it every eval.interval steps and at the end (tulip_mega/training/loop.py).

The standalone command `tulip-mega eval CHECKPOINT` (loads a checkpoint, then runs this
Evaluator) is tulip_mega/evaluate.py: this package does not import the trainer or its
checkpoint code.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from tulip_mega.data.shards import expand_shards
from tulip_mega.data.simple_loader import SimpleLoader, decode_image
from tulip_mega.data.tokenizer import Tokenizer
from tulip_mega.config import Config, ConfigError
from tulip_mega.eval.embed import Embedder, share_from_last_stage
from tulip_mega.eval.formats import Item, load_classification, load_mmvp, load_retrieval, mmvp_metric, mmvp_scores
from tulip_mega.eval.linear_probe import L2_GRID, linear_probe, load_probe_labels
from tulip_mega.eval.retrieval import KS, retrieval_recall
from tulip_mega.eval.zeroshot import class_embeddings, load_classes, zeroshot_accuracy
from tulip_mega.parallel.init import device

log = logging.getLogger("tulip_mega")

TASKS = ("zeroshot", "retrieval", "linear_probe", "mmvp")
DATA_KEYS = {"zeroshot": "zeroshot_shards", "retrieval": "retrieval_shards", "linear_probe": "linear_probe_shards",
             "mmvp": "mmvp_path"}  # the eval.* key naming each task's set
PROBE_KEYS = ("top1", "l2", "holdout_top1", "train_samples", "samples")
ZEROSHOT_KEYS = ("top1", "top5", "samples")
RETRIEVAL_KEYS = tuple(f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in KS) + ("samples",)


def default_classes_path(shards: str) -> str:
    """classes.json in the folder of the first zero-shot shard (where `data synth` writes it)."""
    return str(Path(expand_shards(shards)[0]).parent / "classes.json")


class Evaluator:
    """Evaluates the recipe's eval sets with this rank's model parts (one per virtual stage)
    under the current megatron layout."""

    def __init__(self, cfg: Config, parts: list, tasks: Optional[Sequence[str]] = None) -> None:
        e = cfg.eval
        available = {t: getattr(e, key) for t, key in DATA_KEYS.items()}
        self.tasks = [t for t in (tasks or TASKS) if available[t]]
        for t in tasks or ():
            if not available[t]:
                raise ConfigError(f"eval task {t!r} needs eval.{DATA_KEYS[t]}")
        checked = {f"eval.{DATA_KEYS[t]}": available[t] for t in self.tasks if t != "mmvp"}
        if "linear_probe" in self.tasks:
            checked["eval.linear_probe_val_shards"] = e.linear_probe_val_shards
        probe_own = e.linear_probe_format != "classes_json"
        own_format = {"eval.zeroshot_shards": e.zeroshot_format != "classes_json",
                      "eval.retrieval_shards": e.retrieval_format != "pairs",
                      "eval.linear_probe_shards": probe_own, "eval.linear_probe_val_shards": probe_own}
        for key, spec in checked.items():  # a wrong path must fail now, not after hours of training
            if own_format.get(key):
                continue  # read (and checked) below by its format's loader
            try:
                expand_shards(spec)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"{key}={spec!r}: {err}") from err
        self.cfg = cfg
        self.micro_batch = e.batch_size or cfg.train.micro_batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.first = parallel_state.is_pipeline_first_stage()
        self.embedder = Embedder(parts, self.micro_batch, cfg.model.vision.image_size, cfg.model.text.context_length)
        self.tokenizer = Tokenizer(cfg.data.tokenizer, context_length=cfg.model.text.context_length)
        self.classes = self.retrieval_set = None
        if "zeroshot" in self.tasks:
            if e.zeroshot_format == "classes_json":
                self.classes = load_classes(e.classes or default_classes_path(e.zeroshot_shards))
            else:
                self.classes = _config_error("eval.zeroshot_shards", e.zeroshot_shards, load_classification,
                                             e.zeroshot_format, e.zeroshot_shards, e.split, e.zeroshot_templates)
        if "retrieval" in self.tasks and e.retrieval_format == "clip_benchmark":
            self.retrieval_set = _config_error("eval.retrieval_shards", e.retrieval_shards, load_retrieval,
                                               e.retrieval_shards, e.split)
        self.mmvp_set = None
        if "mmvp" in self.tasks:
            self.mmvp_set = _config_error("eval.mmvp_path", e.mmvp_path, load_mmvp, e.mmvp_path)
        self.probe_labels = None
        self.probe_sets = None
        if "linear_probe" in self.tasks and e.linear_probe_format != "classes_json":
            self.probe_sets = [
                _config_error(key, path, load_classification, e.linear_probe_format, path, split, None, False)
                for key, path, split in (("eval.linear_probe_shards", e.linear_probe_shards, "train"),
                                         ("eval.linear_probe_val_shards", e.linear_probe_val_shards, e.split))]
            if self.probe_sets[0].names != self.probe_sets[1].names:
                raise ConfigError(f"the linear probe's train and val sets name different classes "
                                  f"({self.probe_sets[0].source}: {self.probe_sets[0].names[:3]}..., "
                                  f"{self.probe_sets[1].source}: {self.probe_sets[1].names[:3]}...)")
        elif "linear_probe" in self.tasks:
            self.probe_labels = load_probe_labels(e.linear_probe_classes or default_classes_path(e.linear_probe_shards))

    def run(self) -> dict[str, float]:
        """Every task; metrics keyed eval/<task>/<metric> plus eval/seconds (same on every rank)."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for task in self.tasks:
            metrics = getattr(self, task)()
            out.update({f"eval/{task}/{k}": v for k, v in metrics.items()})
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device())
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)  # identical on every rank
        out["eval/seconds"] = float(seconds)
        return out

    # --- data ----------------------------------------------------------------------------
    def _rank_cap(self) -> Optional[int]:
        """This DP rank's share of eval.max_samples (shares differ by at most one)."""
        m = self.cfg.eval.max_samples
        if m is None:
            return None
        return m // self.dp_size + (1 if self.dp_rank < m % self.dp_size else 0)

    def _shard_batches(self, shards: str, label_of, with_text: bool):
        """(images, tokens | None, labels) of this DP rank's disjoint part of `shards`, in order."""
        cap = self._rank_cap()
        if cap == 0:
            return
        loader = SimpleLoader(
            expand_shards(shards), batch_size=self.micro_batch, image_size=self.cfg.model.vision.image_size,
            tokenizer=self.tokenizer, dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.cfg.run.seed,
            shuffle_buffer=0, num_epochs=1,
        )
        seen = 0
        for batch in loader:
            n = len(batch) if cap is None else min(len(batch), cap - seen)
            labels = torch.tensor([label_of(k) for k in batch.keys[:n]], dtype=torch.long)
            yield batch.images[:n], (batch.tokens[:n] if with_text else None), labels
            seen += n
            if cap is not None and seen >= cap:
                return

    def _item_images(self, items, label_of, capped: bool = True):
        """(images, None, labels) micro-batches of this DP rank's format-reader items (at most its
        share of eval.max_samples when `capped`), decoded like every eval image (decode_image,
        then [-1, 1])."""
        cap, size = (self._rank_cap() if capped else None), self.cfg.model.vision.image_size
        if cap == 0:
            return
        images, labels, seen = [], [], 0
        for item in items:
            try:
                pixels = decode_image(item.image, size)
            except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                raise ValueError(f"cannot decode the image of sample {item.key!r} "
                                 f"({type(err).__name__}: {err})") from err
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            labels.append(label_of(item))
            seen += 1
            if len(images) == self.micro_batch or seen == cap:
                yield _normalise(images), None, torch.tensor(labels, dtype=torch.long)
                images, labels = [], []
            if seen == cap:
                return
        if images:
            yield _normalise(images), None, torch.tensor(labels, dtype=torch.long)

    def _prompt_batches(self, prompts: list[tuple[str, int]]):
        for i in range(0, len(prompts), self.micro_batch):
            part = prompts[i : i + self.micro_batch]
            yield None, self.tokenizer.encode([p for p, _ in part]), torch.tensor([c for _, c in part])

    # --- tasks ---------------------------------------------------------------------------
    def zeroshot(self) -> dict[str, float]:
        """Top-1/top-5 accuracy of classifying the zero-shot images by their class prompts."""
        classes = self.classes
        prompts = [(p, c) for c, ps in enumerate(classes.prompts) for p in ps]
        mine = prompts[self.dp_rank :: self.dp_size]  # the prompt set is split over DP too
        text = self.embedder.embed(self._prompt_batches(mine) if self.first else None, "zero-shot prompts")
        if self.first and self.cfg.eval.zeroshot_format != "classes_json":
            source = self._item_images(classes.items(self.dp_rank, self.dp_size), lambda item: item.label)
        elif self.first:
            source = self._shard_batches(self.cfg.eval.zeroshot_shards, classes.label, with_text=False)
        images = self.embedder.embed(source if self.first else None, "zero-shot images")
        values = [0.0] * len(ZEROSHOT_KEYS)
        if images is not None:  # last stage
            class_emb = class_embeddings(text["text_emb"], text["labels"], len(classes))
            acc = zeroshot_accuracy(images["image_emb"], images["labels"], class_emb, ks=(1, 5))
            values = [acc[1], acc[5], float(images["labels"].shape[0])]
        return dict(zip(ZEROSHOT_KEYS, share_from_last_stage(values)))

    def retrieval(self) -> dict[str, float]:
        """Recall@1/5/10 image->text and text->image: over the set's pairs, or for a clip_benchmark
        set by the COCO protocol (several captions per image; tulip_mega/eval/retrieval.py)."""
        if self.retrieval_set is not None:
            return self._retrieval_grouped()
        pairs = self.embedder.embed(
            self._shard_batches(self.cfg.eval.retrieval_shards, lambda _key: 0, with_text=True)
            if self.first else None, "retrieval pairs",
        )
        values = [0.0] * len(RETRIEVAL_KEYS)
        if pairs is not None:
            recall = retrieval_recall(pairs["image_emb"], pairs["text_emb"], KS)
            values = [recall[k] for k in RETRIEVAL_KEYS[:-1]] + [float(pairs["labels"].shape[0])]
        return dict(zip(RETRIEVAL_KEYS, share_from_last_stage(values)))


    def _retrieval_grouped(self) -> dict[str, float]:
        """Images and their captions embedded in two passes, each labelled with the image's uid;
        the gathered uids say which captions belong to which image, whatever the layout. The
        captions are those of the images embedded (eval.max_samples caps images)."""
        read = self.retrieval_set.items
        images = self.embedder.embed(self._item_images(read(self.dp_rank, self.dp_size), lambda item: item.uid)
                                     if self.first else None, "retrieval images")
        texts = self.embedder.embed(self._caption_batches(read(self.dp_rank, self.dp_size)) if self.first else None,
                                    "retrieval captions")
        values = [0.0] * (len(RETRIEVAL_KEYS) + 1)
        if images is not None:  # last stage
            uids, order = torch.sort(images["labels"])
            text_image = torch.searchsorted(uids, texts["labels"])
            recall = retrieval_recall(images["image_emb"][order], texts["text_emb"], KS, text_image=text_image)
            values = [recall[k] for k in RETRIEVAL_KEYS[:-1]] + [float(uids.shape[0]), float(text_image.shape[0])]
        return dict(zip((*RETRIEVAL_KEYS, "captions"), share_from_last_stage(values)))

    def _caption_batches(self, items):
        """(None, tokens, image uid) micro-batches of the captions of this rank's (capped) images."""
        cap = self._rank_cap()
        captions: list[tuple[str, int]] = []
        for n, item in enumerate(items):
            if cap is not None and n >= cap:
                break
            captions.extend((c, item.uid) for c in item.captions)
        for i in range(0, len(captions), self.micro_batch):
            part = captions[i : i + self.micro_batch]
            yield None, self.tokenizer.encode([c for c, _ in part]), torch.tensor([u for _, u in part])

    def mmvp(self) -> dict[str, float]:
        """MMVP-VLM pair accuracy per visual pattern and averaged (tulip_mega/eval/formats.py
        mmvp_scores): every image and every 'a photo of <statement>' embedded once, keyed by qid
        (the whole set: eval.max_samples does not apply)."""
        questions = self.mmvp_set.questions()[self.dp_rank :: self.dp_size]
        images = (Item(q, str(path), path.read_bytes()) for q, _, path in questions)
        image = self.embedder.embed(self._item_images(images, lambda item: item.uid, capped=False)
                                     if self.first else None)
        text = self.embedder.embed(self._prompt_batches([(prompt, q) for q, prompt, _ in questions])
                                   if self.first else None)
        names = [*map(mmvp_metric, self.mmvp_set.patterns), "average", "pairs"]
        values = [0.0] * len(names)
        if image is not None:  # last stage
            by_qid = [dict(zip(e["labels"].tolist(), e[key])) for e, key in ((image, "image_emb"), (text, "text_emb"))]
            scores = mmvp_scores(self.mmvp_set, *by_qid)
            values = [scores[n] for n in names]
        return dict(zip(names, share_from_last_stage(values)))

    def linear_probe(self) -> dict[str, float]:
        """Val top-1 of a logistic regression on the frozen image embeddings of the probe's train set.

        The embedder returns each DP rank's part in turn, so the row order depends on the layout;
        rows are put in one canonical order (by crc32 of the sample key, carried with the label)
        before the probe's seeded held-out split, so every layout fits the same problem."""
        e = self.cfg.eval
        if self.probe_sets is not None:  # a format reader: the sample's uid orders it
            n_cls = len(self.probe_sets[0])
            sources = [self._item_images(ds.items(self.dp_rank, self.dp_size), lambda it: it.uid * n_cls + it.label)
                       for ds in self.probe_sets]
        else:
            names = self.probe_labels
            n_cls = len(names.names)

            def code(key: str) -> int:  # crc32(key) and the class in one non-negative int64
                return zlib.crc32(key.encode()) * n_cls + names.label(key)

            sources = [self._shard_batches(shards, code, with_text=False)
                       for shards in (e.linear_probe_shards, e.linear_probe_val_shards)]
        sets = [self.embedder.embed(source if self.first else None) for source in sources]
        keys = list(PROBE_KEYS) + [f"holdout_top1_l2_{l2:g}" for l2 in L2_GRID]
        values = [0.0] * len(keys)
        if sets[0] is not None:  # last stage
            (train_x, train_y), (val_x, val_y) = [_canonical(s["image_emb"], s["labels"], n_cls) for s in sets]
            result = linear_probe(train_x, train_y, val_x, val_y, n_cls, seed=self.cfg.run.seed)
            values = [result[k] for k in PROBE_KEYS] + list(result["sweep"])
        return dict(zip(keys, share_from_last_stage(values)))


def _normalise(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [3, H, W] images -> float32 [k, 3, H, W] in [-1, 1] (the SimpleLoader's normalisation)."""
    return torch.stack(images).to(torch.float32).div_(127.5).sub_(1.0)


def _config_error(key: str, value, loader, *args):
    """Run a format loader; a missing or malformed set becomes a ConfigError naming the recipe key."""
    try:
        return loader(*args)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}={value!r}: {err}") from err


def _canonical(features: torch.Tensor, codes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by key hash (stable), and the class labels decoded from the codes."""
    order = torch.sort(codes, stable=True).indices
    return features[order], codes[order] % num_classes


def write_results(path: Path, metrics: dict[str, float], **context) -> None:
    """One JSON file per evaluation (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**context, "metrics": metrics}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
