"""Build the training loader for this data-parallel rank from the recipe.

The single place the trainer learns about data: swapping the simple loader for the DALI one
(a later issue) changes this function only. TP ranks of one DP rank build identical loaders
(same shards, same seed), so they see identical batches.
"""

from __future__ import annotations

from dataloaders.base import BatchLoader
from dataloaders.shards import expand_shards
from dataloaders.simple_loader import SimpleLoader
from dataloaders.tokenizer import Tokenizer
from tulip_mega.config import Config, ConfigError


def build_train_loader(cfg: Config, dp_rank: int, dp_size: int) -> BatchLoader:
    """The loader yielding this DP rank's micro-batches (size train.micro_batch_size)."""
    tokenizer = Tokenizer(cfg.data.tokenizer, context_length=cfg.model.text.context_length)
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but "
            f"model.text.vocab_size={cfg.model.text.vocab_size}; raise model.text.vocab_size "
            f"(a multiple of parallel.tensor_parallel) or train a smaller tokenizer"
        )
    return SimpleLoader(
        expand_shards(cfg.data.train_shards),
        batch_size=cfg.train.micro_batch_size,
        image_size=cfg.model.vision.image_size,
        tokenizer=tokenizer,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.run.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
