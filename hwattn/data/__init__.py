"""Corpora, tokenizers and token shards: `hwattn data build` and the training data loader."""
