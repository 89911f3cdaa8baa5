"""Training data: document sources, tokenizers, packed memory-mapped token shards with optional canary rows,
SFT examples with per-token supervision, and the rank-sharded resumable sampler."""
from goldfish_ds.data.packed import (
    PADDING,
    CanarySet,
    PackedTokenDataset,
    ShardedSampler,
    write_packed_shards,
    write_sft_shards,
)
from goldfish_ds.data.sft import SFT_FORMATS, SupervisedExample, chat_generation_prompt, read_sft_examples
from goldfish_ds.data.sources import builtin_documents, read_documents
from goldfish_ds.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "PADDING", "CanarySet", "PackedTokenDataset", "ShardedSampler", "Tokenizer", "builtin_documents", "load_tokenizer",
    "read_documents", "train_sentencepiece", "write_packed_shards",
    "SFT_FORMATS", "SupervisedExample", "chat_generation_prompt", "read_sft_examples", "write_sft_shards",
]
