"""Memorization evaluation of one or more HF causal LMs on training documents (see goldfish_ds.eval).

Greedy extraction (prompt with all but a document's last n tokens, decode n), optionally 30-beam
extraction, membership inference against held-out documents, and where generations diverge relative to
a goldfish mask. Writes results.json, summary.md and plots to --out.

  python scripts/evaluate_memorization.py --model standard=out/std/hf --model goldfish=out/gf/hf \\
      --documents canaries.jsonl --nonmembers heldout.jsonl --goldfish_k 4 --goldfish_h 13 --out report/
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import torch

from goldfish_ds import STRATEGIES, GoldfishConfig
from goldfish_ds.cli import restart_with_passive_openmp
from goldfish_ds.config import WINDOWS
from goldfish_ds.eval import (
    evaluate_models,
    load_model_tokenizer,
    summary_markdown,
    write_report,
)
from goldfish_ds.training.arguments import parse_exempt_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_model(spec: str) -> tuple:
    name, sep, directory = spec.partition("=")
    return (name, directory) if sep else (Path(spec.rstrip("/")).name, spec)


def main(argv: Optional[List[str]] = None) -> None:
    if argv is None:
        restart_with_passive_openmp(__spec__.name)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="an HF causal LM directory, optionally named (default name: the directory's); repeat")
    parser.add_argument("--documents", required=True, help="JSONL of training documents: 'text', optionally 'ids'")
    parser.add_argument("--nonmembers", help="JSONL of held-out documents: enables membership inference")
    parser.add_argument("--num_docs", type=int, help="use the first N documents of each file (default: all)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--suffix_len", type=int, default=50, help="n, the tokens decoded and compared (default 50)")
    parser.add_argument("--prefix_len", type=int,
                        help="prompt with the first P tokens instead of all but the last n")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--beam_search", action="store_true", help="also run the beam-search extraction (slow)")
    parser.add_argument("--num_beams", type=int, default=30, help="beams of --beam_search (default 30, the paper's)")
    parser.add_argument("--min_k", type=float, default=20.0, help="k of the min-k%% prob attack, in %% (default 20)")
    parser.add_argument("--goldfish_k", type=int, help="divergence analysis against this goldfish k (default off)")
    parser.add_argument("--goldfish_h", type=int, default=13, help="goldfish h (default 13)")
    parser.add_argument("--goldfish_strategy", default="hash-table", choices=sorted(STRATEGIES))
    parser.add_argument("--goldfish_window", default="inclusive", choices=WINDOWS)
    parser.add_argument("--goldfish_exempt_ids", default="special",
                        help="ids never dropped, as in training: 'special' = the tokenizer's BOS/EOS/PAD (of the "
                             "first model), 'none', or comma-separated ids")
    parser.add_argument("--tokenizer", help="a .model file or HF tokenizer directory for every model "
                                            "(default: each model directory's tokenizer.model, then tokenizer.json)")
    parser.add_argument("--max_length", type=int,
                        help="cut documents to this many tokens (default: max_position_embeddings + 1)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's; 1 is fastest for tiny models on busy cores)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    models = dict(parse_model(spec) for spec in args.model)
    if len(models) != len(args.model):
        parser.error("--model names must be distinct")
    goldfish = None
    if args.goldfish_k is not None:
        special = (load_model_tokenizer(next(iter(models.values())), args.tokenizer).special_ids
                   if args.goldfish_exempt_ids.strip() == "special" else ())
        try:
            exempt = parse_exempt_ids(args.goldfish_exempt_ids, special)
        except ValueError as e:
            parser.error(str(e))
        goldfish = GoldfishConfig(k=args.goldfish_k, h=args.goldfish_h, strategy=args.goldfish_strategy,
                                  window=args.goldfish_window, exempt_ids=exempt)
    results = evaluate_models(models, args.documents, nonmembers=args.nonmembers, num_docs=args.num_docs,
                              n=args.suffix_len, prefix_len=args.prefix_len, batch_size=args.batch_size,
                              num_beams=args.num_beams if args.beam_search else None, goldfish=goldfish,
                              min_k_percent=args.min_k, tokenizer=args.tokenizer, max_length=args.max_length,
                              device=args.device, dtype=DTYPES[args.dtype])
    paths = write_report(results, args.out)
    print(summary_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
