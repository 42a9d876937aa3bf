"""Data: WebDataset shards, synthetic data, tokenization and loaders."""
