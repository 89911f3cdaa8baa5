r"""Tokenize documents into packed token shards (memory-mapped, uint16 or uint32) with a manifest.

Each document is encoded, prefixed with BOS and followed by EOS when the tokenizer has them, and the
documents are concatenated into shards; docs_*.npy record where each starts. With --canary, those documents
are instead placed one per row of seq_len + 1 positions (truncated to fit, padded), stored once in
canary_rows.bin with their texts and exact ids in canary.jsonl, and served --canary_repeats times.

SFT data (--format chat or prompt_response, .jsonl inputs): only the responses are supervised targets; the
per-token supervision goes beside the token shards. chat: records {"messages": [{"role": "system"|"user"|
"assistant", "content": ...}, ...]}, rendered by the tokenizer's chat template (an HF tokenizer directory with
`chat_template`), or without one by the plain template: BOS, then per message "System: {content}\n" or
"User: {content}\n", and for an assistant turn "Assistant: " then the supervised "{content}" and EOS.
Supervised: each assistant turn's content and the marker that ends it. prompt_response: records {"prompt": ...,
"response": ...}, written as BOS + prompt + response + EOS (the response and EOS supervised; put any separator at
the end of the prompt). Each example fills its own row of --seq_len + 1 ids (an example longer than --seq_len ids
is cut to its first --seq_len, counted in the printout; padding is never a target), or with --pack the examples
are concatenated like documents (train with --goldfish_boundaries reset so masks restart after each EOS).
"""
from __future__ import annotations

import argparse
import itertools
from typing import List, Optional

from tqdm import tqdm

from goldfish_ds.data import (
    SFT_FORMATS,
    CanarySet,
    load_tokenizer,
    read_documents,
    read_sft_examples,
    write_packed_shards,
    write_sft_shards,
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
    parser.add_argument("--format", choices=("text",) + SFT_FORMATS, default="text",
                        help="text: documents for pretraining (default); chat / prompt_response: SFT records from "
                        ".jsonl inputs, only the responses supervised (see above)")
    parser.add_argument("--pack", action="store_true",
                        help="SFT formats: concatenate the examples instead of one per row of --seq_len + 1")
    parser.add_argument("--seq_len", type=int,
                        help="training sequence length; required with --canary and with an SFT --format without --pack")
    parser.add_argument("--num_canary", type=int, help="use only the first N canary documents (default: all)")
    args = parser.parse_args(argv)
    if not args.input and not args.canary:
        parser.error("give --input, --canary, or both")
    if args.format != "text":
        return _prepare_sft(parser, args)
    if args.pack:
        parser.error("--pack applies only with --format chat or prompt_response")
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


def _prepare_sft(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.canary or args.canary_repeats != 1 or args.num_canary is not None or args.text_field != "text":
        parser.error(f"--canary, --canary_repeats, --num_canary and --text_field apply only with --format text, "
                     f"not --format {args.format}")
    if not args.input:
        parser.error(f"--format {args.format} needs --input")
    if args.pack == (args.seq_len is not None):
        parser.error(f"--format {args.format}: give --seq_len (one example per row) or --pack, not "
                     f"{'both' if args.pack else 'neither'}")
    if args.seq_len is not None and args.seq_len < 1:
        parser.error(f"--seq_len must be >= 1, got {args.seq_len}")
    tok = load_tokenizer(args.tokenizer)
    pad_id = next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)
    examples = tqdm(read_sft_examples(args.input, args.format, tok), desc="examples", unit="ex")
    manifest = write_sft_shards(((e.ids, e.supervised) for e in examples), args.out, tok.vocab_size,
                                sft_format=args.format, seq_len=args.seq_len, pad_id=pad_id,
                                shard_tokens=args.shard_tokens)
    sft = manifest["sft"]
    layout = "packed" if args.pack else f"one per row of {args.seq_len} + 1"
    print(f"wrote {sft['num_examples']} {args.format} examples ({layout}), {manifest['num_tokens']} tokens of which "
          f"{sft['supervised_tokens']} supervised, in {len(manifest['shards'])} shard(s) of {manifest['dtype']} to "
          f"{args.out}")
    if not args.pack:
        print(f"{sft['num_truncated']} examples longer than --seq_len {args.seq_len} cut to it "
              f"({sft['num_truncated_to_nothing']} of them kept no supervised token)")


if __name__ == "__main__":
    main()
