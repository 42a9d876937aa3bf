"""Referring-expression localisation with a LocCa decoder (SigLIP 2): given an image and a
region's caption, the decoder writes the region's box as four location tokens, greedily
(each the most likely location token given the ones before); a box is correct when its IoU with
the true box is at least 0.5 (RefCOCO's accuracy, which LocCa and SigLIP 2 report).

On the scenes set every object is a region ("small red circle"; "red circle" in relation
scenes), so the metric measures what the contrastive recipes cannot: where a named object is.
Only expressions that name one object of their image are scored (relation scenes, and count
scenes of one object).
Its reference level is a constant guess, the mean box of the regions, scored the same way.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import torch

from tulip_mega.data.base import IMAGE_MEAN, IMAGE_STD
from tulip_mega.data.image_files import image_file
from tulip_mega.data.shards import expand_shards, iter_samples
from tulip_mega.data.simple_loader import decode_image
from tulip_mega.losses.locca import LoccaVocab


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a [n, 4] and b [n, 4] (x0, y0, x1, y1), row by row."""
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)


@torch.no_grad()
def greedy_boxes(model, images: torch.Tensor, region_tokens: torch.Tensor, vocab: LoccaVocab,
                 pad_id: int) -> torch.Tensor:
    """Boxes [b, 4] the LocCa decoder of `model` (one process: the whole TulipModel) writes for
    region captions [b, L] of images [b, 3, H, W]."""
    decoder = model.locca_decoder
    patches = model.vision_block(model.vision_embed(images), attention_mask=None)  # [P, b, h]
    b, length = images.shape[0], decoder.length
    prefixes = []
    for row in region_tokens.tolist():
        ids = row[: row.index(pad_id)] if pad_id in row else row
        prefixes.append([vocab.task("aref")] + ids)
    locations = torch.arange(vocab.text, vocab.text + vocab.bins, device=images.device)
    chosen: list[list[int]] = [[] for _ in range(b)]
    for _ in range(4):
        seqs = [p + c for p, c in zip(prefixes, chosen)]
        inputs = torch.tensor([s + [pad_id] * (length - len(s)) for s in seqs], device=images.device)
        logits = decoder(patches, inputs)  # [Ld, b, V]
        at = torch.tensor([len(s) - 1 for s in seqs], device=images.device)
        step = logits[at, torch.arange(b, device=images.device)][:, locations]  # [b, bins]
        for i, token in enumerate((vocab.text + step.argmax(-1)).tolist()):
            chosen[i].append(token)
    return vocab.box(torch.tensor(chosen))


def scene_regions(shards: str, image_size: int, tokenizer) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(image uint8 [H, W, 3], region caption tokens [L], true box [4]) for every region of every
    sample of `shards` (the json "regions" field) whose caption names one object of its image:
    as in RefCOCO, an expression that fits several objects ("small red circle" in a scene of three)
    has no single right box, so it is not scored."""
    for shard in expand_shards(shards):
        for sample in iter_samples(shard):
            regions = json.loads(sample["json"]).get("regions", []) if "json" in sample else []
            names = [r["caption"] for r in regions]
            regions = [r for r in regions if names.count(r["caption"]) == 1]
            if not regions:
                continue
            image = decode_image(sample[image_file(sample)], image_size)
            tokens = tokenizer.encode([r["caption"] for r in regions])
            for r, row in zip(regions, tokens):
                yield image, row, torch.tensor(r["box"], dtype=torch.float32)


def refer_metrics(model, shards: str, image_size: int, tokenizer, vocab: LoccaVocab, batch: int = 64,
                  limit: int = 2048) -> dict[str, float]:
    """locca/refer_acc50 (IoU >= 0.5), locca/refer_iou (mean IoU), the constant mean-box guess's
    accuracy (locca/refer_acc50_chance) and locca/refer_regions, over at most `limit` regions."""
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    device = next(model.parameters()).device
    predicted, truth = [], []
    items = []
    for n, item in enumerate(scene_regions(shards, image_size, tokenizer)):
        if n >= limit:
            break
        items.append(item)
    for lo in range(0, len(items), batch):
        chunk = items[lo : lo + batch]
        images = torch.from_numpy(np.stack([c[0] for c in chunk])).permute(0, 3, 1, 2).float() / 255.0
        images = ((images - mean) / std).to(device)
        tokens = torch.stack([c[1] for c in chunk]).to(device)
        predicted.append(greedy_boxes(model, images, tokens, vocab, tokenizer.pad_id).cpu())
        truth.append(torch.stack([c[2] for c in chunk]))
    if not items:
        raise ValueError(f"no sample of {shards} has regions (the json 'regions' field)")
    pred, true = torch.cat(predicted), torch.cat(truth)
    iou = box_iou(pred, true)
    guess = box_iou(true.mean(0, keepdim=True).expand_as(true), true)
    return {"locca/refer_acc50": float((iou >= 0.5).float().mean()), "locca/refer_iou": float(iou.mean()),
            "locca/refer_acc50_chance": float((guess >= 0.5).float().mean()), "locca/refer_regions": float(len(iou))}
