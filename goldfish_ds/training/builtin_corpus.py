"""The embedded default corpus: Python's bundled documentation topics, tokenized with a tokenizer trained on them."""
from __future__ import annotations

from pathlib import Path

from goldfish_ds.data import (
    builtin_documents,
    load_tokenizer,
    train_sentencepiece,
    write_packed_shards,
)

VALIDATION_EVERY = 10  # every 10th document (by topic name) is held out for validation


def prepare_builtin_corpus(out_dir: str, vocab_size: int) -> None:
    """Write out_dir/{tokenizer.model, train/, val/} once (reused when complete)."""
    root = Path(out_dir)
    if (root / "train" / "manifest.json").is_file() and (root / "val" / "manifest.json").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    docs = builtin_documents()
    train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    tok = load_tokenizer(train_sentencepiece(train, str(root / "tokenizer"), vocab_size))
    for name, texts in (("train", train), ("val", val)):
        write_packed_shards(map(tok.encode_document, texts), str(root / name), tok.vocab_size)
