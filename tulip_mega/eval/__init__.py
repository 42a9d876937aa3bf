"""Evaluation: zero-shot classification, image-text retrieval (COCO protocol), MMVP-VLM and linear
probes, on this project's shards or the standard formats (formats.py: CLIP_benchmark webdataset,
ImageFolder, ImageNet-1k, MMVP-VLM), one set at a time or as a suite (suite.py).

Pure metrics (zeroshot.py, retrieval.py) import only torch; the distributed embedding
extraction (embed.py) and the runner (runner.py: in-training hook and `tulip-mega eval`)
need megatron, so they are imported from their modules, not here.
"""

from tulip_mega.eval.retrieval import retrieval_recall
from tulip_mega.eval.zeroshot import ClassSet, class_embeddings, load_classes, topk_accuracy, zeroshot_accuracy

__all__ = ["ClassSet", "class_embeddings", "load_classes", "retrieval_recall", "topk_accuracy", "zeroshot_accuracy"]
