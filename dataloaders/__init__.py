"""Data: WebDataset shards, synthetic data, tokenization and loaders."""

from dataloaders.base import IMAGE_MEAN, IMAGE_STD, Batch, BatchLoader
from dataloaders.shards import ShardReadError, ShardWriter, expand_shards, iter_samples
from dataloaders.simple_loader import SimpleLoader
from dataloaders.synthetic import write_shapes_dataset
from dataloaders.tokenizer import Tokenizer, train_tokenizer, train_tokenizer_from_shards

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "Batch",
    "BatchLoader",
    "ShardReadError",
    "ShardWriter",
    "SimpleLoader",
    "Tokenizer",
    "expand_shards",
    "iter_samples",
    "train_tokenizer",
    "train_tokenizer_from_shards",
    "write_shapes_dataset",
]
