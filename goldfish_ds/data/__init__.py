"""Training data: tokenizers, packed memory-mapped token shards, and the rank-sharded resumable sampler."""
from goldfish_ds.data.packed import PackedTokenDataset, ShardedSampler, write_packed_shards
from goldfish_ds.data.sources import read_documents
from goldfish_ds.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = ["PackedTokenDataset", "ShardedSampler", "Tokenizer", "load_tokenizer", "read_documents",
           "train_sentencepiece", "write_packed_shards"]
