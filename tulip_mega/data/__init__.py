"""Run-time data: WebDataset shards, tokenization, views and loaders (offline generation: tulip_mega.datagen).

The DALI loader (``tulip_mega.data.dali_loader.DaliLoader``) is not imported here: nvidia.dali is
an optional extra, and importing this package must stay cheap and work without it.
"""

from tulip_mega.data.base import IMAGE_MEAN, IMAGE_STD, Batch, BatchLoader
from tulip_mega.data.dali_pipeline import ViewPlan, dali_available
from tulip_mega.data.eda import EdaConfig, eda
from tulip_mega.data.sample_stream import Damaged, Position, SampleStream
from tulip_mega.data.shards import ShardReadError, ShardWriter, expand_shards, iter_samples
from tulip_mega.data.simple_loader import SimpleLoader
from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer, train_tokenizer_from_shards

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "Batch",
    "BatchLoader",
    "Damaged",
    "EdaConfig",
    "Position",
    "SampleStream",
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
]
