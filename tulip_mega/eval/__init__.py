"""Evaluation: zero-shot classification and image-text retrieval on WebDataset shards.

Pure metrics (zeroshot.py, retrieval.py) import only torch; the distributed embedding
extraction (embed.py) and the runner (runner.py: in-training hook and `tulip-mega eval`)
need megatron, so they are imported from their modules, not here.
"""

from tulip_mega.eval.retrieval import retrieval_recall
from tulip_mega.eval.zeroshot import ClassSet, class_embeddings, load_classes, topk_accuracy, zeroshot_accuracy

__all__ = ["ClassSet", "class_embeddings", "load_classes", "retrieval_recall", "topk_accuracy", "zeroshot_accuracy"]
