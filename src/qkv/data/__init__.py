"""qkv.data: text corpora, token shards and the deterministic batch loader for pretraining."""
