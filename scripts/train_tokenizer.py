"""Train a sentencepiece tokenizer (BPE, byte fallback; UNK=0, BOS=1, EOS=2, PAD=3) on text files."""
import argparse

from goldfish_ds.data import read_documents, train_sentencepiece


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (objects with a 'text' field) or .txt files")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, default=8000, help="vocabulary size (default 8000)")
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"], help="sentencepiece model type")
    args = parser.parse_args()
    print(train_sentencepiece(read_documents(args.input), args.out, args.vocab_size, args.model_type))


if __name__ == "__main__":
    main()
