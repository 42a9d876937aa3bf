"""Data: WebDataset shards, synthetic data, tokenization and loaders.

The DALI loader (``dataloaders.dali_loader.DaliLoader``) is not imported here: nvidia.dali is
an optional extra, and importing this package must stay cheap and work without it.
"""

from dataloaders.base import IMAGE_MEAN, IMAGE_STD, Batch, BatchLoader
from dataloaders.dali_pipeline import ViewPlan, dali_available
from dataloaders.eda import EdaConfig, eda
from dataloaders.shards import ShardReadError, ShardWriter, expand_shards, iter_samples
from dataloaders.simple_loader import SimpleLoader
from dataloaders.synthetic import write_shapes_dataset
from dataloaders.tokenizer import Tokenizer, train_tokenizer, train_tokenizer_from_shards

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "Batch",
    "BatchLoader",
    "EdaConfig",
    "ShardReadError",
    "ShardWriter",
    "SimpleLoader",
    "Tokenizer",
    "ViewPlan",
    "dali_available",
    "eda",
    "expand_shards",
    "iter_samples",
    "train_tokenizer",
    "train_tokenizer_from_shards",
    "write_shapes_dataset",
]
