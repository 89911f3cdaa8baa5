"""Train a sentencepiece tokenizer (BPE, byte fallback; UNK=0, BOS=1, EOS=2, PAD=3) on documents."""
from __future__ import annotations

import argparse
from typing import List, Optional

from tqdm import tqdm

from goldfish_ds.data import read_documents, train_sentencepiece
from goldfish_ds.data.sources import INPUT_FORMATS


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, help=f"training documents: {INPUT_FORMATS}")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, default=8000, help="vocabulary size (default 8000)")
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"], help="sentencepiece model type")
    parser.add_argument("--text_field", default="text", help="field / column holding the text (default 'text')")
    args = parser.parse_args(argv)
    texts = tqdm(read_documents(args.input, args.text_field), desc="documents", unit="doc")
    print(train_sentencepiece(texts, args.out, args.vocab_size, args.model_type))


if __name__ == "__main__":
    main()
