"""ImageNet / built-in synthetic data -> WebDataset shards, and the loaders that read them."""
