"""Tokenize text files into packed token shards (memory-mapped, uint16 or uint32) with a manifest.

Each document is encoded, prefixed with BOS and followed by EOS when the tokenizer has them, and the
documents are concatenated into shards; docs_*.npy record where each starts.
"""
import argparse

from goldfish_ds.data import load_tokenizer, read_documents, write_packed_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (objects with a 'text' field) or .txt files")
    parser.add_argument("--tokenizer", required=True,
                        help="a sentencepiece .model file (e.g. Llama's tokenizer.model) or an HF tokenizer directory")
    parser.add_argument("--out", required=True, help="output directory (tokens_*.bin, docs_*.npy, manifest.json)")
    parser.add_argument("--shard_tokens", type=int, default=1 << 26, help="tokens per shard (default 2^26)")
    args = parser.parse_args()
    tok = load_tokenizer(args.tokenizer)
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    suffix = [tok.eos_id] if tok.eos_id is not None else []
    documents = (prefix + tok.encode(text) + suffix for text in read_documents(args.input))
    manifest = write_packed_shards(documents, args.out, tok.vocab_size, args.shard_tokens)
    print(f"wrote {manifest['num_docs']} documents, {manifest['num_tokens']} tokens in {len(manifest['shards'])} "
          f"shard(s) of {manifest['dtype']} to {args.out}")


if __name__ == "__main__":
    main()
