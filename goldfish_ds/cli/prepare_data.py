"""Tokenize documents into packed token shards (memory-mapped, uint16 or uint32) with a manifest.

Each document is encoded, prefixed with BOS and followed by EOS when the tokenizer has them, and the
documents are concatenated into shards; docs_*.npy record where each starts. With --canary, those documents
are instead placed one per row of seq_len + 1 positions (truncated to fit, padded), stored once in
canary_rows.bin with their texts and exact ids in canary.jsonl, and served --canary_repeats times.
"""
from __future__ import annotations

import argparse
import itertools
from typing import List, Optional

from tqdm import tqdm

from goldfish_ds.data import (
    CanarySet,
    load_tokenizer,
    read_documents,
    write_packed_shards,
)
from goldfish_ds.data.sources import INPUT_FORMATS


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=[],
                        help=f"background documents: {INPUT_FORMATS}; optional when --canary is given")
    parser.add_argument("--tokenizer", required=True,
                        help="a sentencepiece .model file (e.g. Llama's tokenizer.model) or an HF tokenizer directory")
    parser.add_argument("--out", required=True, help="output directory (tokens_*.bin, docs_*.npy, manifest.json, "
                        "and with --canary canary_rows.bin and canary.jsonl)")
    parser.add_argument("--shard_tokens", type=int, default=1 << 26, help="tokens per shard (default 2^26)")
    parser.add_argument("--text_field", default="text", help="field / column holding the text (default 'text')")
    parser.add_argument("--canary", nargs="+", default=[], help="canary documents, same formats as --input")
    parser.add_argument("--canary_repeats", type=int, default=1,
                        help="times the canary set appears in the dataset (default 1)")
    parser.add_argument("--seq_len", type=int, help="training sequence length; required with --canary")
    parser.add_argument("--num_canary", type=int, help="use only the first N canary documents (default: all)")
    args = parser.parse_args(argv)
    if not args.input and not args.canary:
        parser.error("give --input, --canary, or both")
    if args.canary and args.seq_len is None:
        parser.error("--canary needs --seq_len")
    if args.num_canary is not None and args.num_canary < 1:
        parser.error(f"--num_canary must be >= 1, got {args.num_canary}")
    if not args.canary and (args.seq_len is not None or args.num_canary is not None or args.canary_repeats != 1):
        parser.error("--seq_len, --num_canary and --canary_repeats apply only with --canary")

    canary_texts = list(itertools.islice(read_documents(args.canary, args.text_field), args.num_canary))
    if args.num_canary is not None and len(canary_texts) < args.num_canary:
        parser.error(f"--num_canary {args.num_canary}, but the canary inputs hold {len(canary_texts)} documents")
    tok = load_tokenizer(args.tokenizer)
    canary = None
    if args.canary:
        canary_ids = [tok.encode_document(t) for t in canary_texts]
        canary = CanarySet(canary_texts, canary_ids, args.seq_len, args.canary_repeats)
    texts = tqdm(read_documents(args.input, args.text_field), desc="documents", unit="doc")
    manifest = write_packed_shards((tok.encode_document(t) for t in texts), args.out, tok.vocab_size,
                                   args.shard_tokens, canary)
    print(f"wrote {manifest['num_docs']} documents, {manifest['num_tokens']} tokens in {len(manifest['shards'])} "
          f"shard(s) of {manifest['dtype']} to {args.out}")
    if canary is not None:
        c = manifest["canary"]
        print(f"wrote {c['num_docs']} canary documents ({c['num_truncated']} truncated to seq_len + 1 = "
              f"{c['seq_len'] + 1} tokens), repeated {c['repeats']} times")


if __name__ == "__main__":
    main()
