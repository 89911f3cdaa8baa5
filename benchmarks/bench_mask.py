"""Goldfish mask throughput (M tokens/s): the compiled kernels vs the official implementation's torch ops.

The official `apply_goldfish(strategy="hash-table")` clones the targets, multiplies each window with
`unfold(...).prod(-1)`, takes it modulo the table size, looks the table up, compares with 1/k and writes
ignore_index into the dropped positions; `official_apply_goldfish` below does exactly those torch
operations and is timed against our `apply_goldfish` (same output). `official_mask` is its mask alone
(the dropped positions, before the clone and the write), timed against our `goldfish_mask`.
"reset" is our goldfish_mask with document boundaries (GoldfishConfig.boundary_id): the labels hold an EOS
every --document tokens, and the mask is computed as if each document were a row of its own.
Usage: python benchmarks/bench_mask.py [--device cpu|cuda] [--repeats 5] [--batch 16x4096] [--calls 10]
       [--document 1000]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_interleaved  # noqa: E402

from goldfish_ds import GoldfishConfig, apply_goldfish, goldfish_mask  # noqa: E402
from goldfish_ds.table import TABLE_SIZE, hash_table  # noqa: E402


def official_mask(labels: torch.Tensor, k: int, h: int, table: torch.Tensor) -> torch.Tensor:
    """Dropped targets h - 1 onwards of each row, as the official code computes them."""
    return table[labels.unfold(1, h, 1).prod(dim=-1) % TABLE_SIZE] < 1 / k


def official_apply_goldfish(labels: torch.Tensor, k: int, h: int, table: torch.Tensor) -> torch.Tensor:
    masked = labels.clone()
    masked[:, h - 1:][official_mask(labels, k, h, table)] = -100
    return masked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", default="16x4096", help="BxT labels per call (default 16x4096)")
    parser.add_argument("--calls", type=int, default=10,
                        help="back-to-back calls per timed sample (default 10: throughput of repeated calls; "
                             "1: each call right after the others, caches holding their data)")
    parser.add_argument("--document", type=int, default=1000, help="tokens per document of the reset columns "
                                                                       "(an EOS label ends each; default 1000)")
    args = parser.parse_args()
    B, T = map(int, args.batch.split("x"))
    eos = 2
    labels = torch.randint(0, 32000, (B, T), device=args.device)
    labels.view(-1)[args.document - 1::args.document] = eos
    table = hash_table().to(args.device)
    rows = []
    for h in (13, 50):
        cfg = GoldfishConfig(k=4, h=h)
        rolling = GoldfishConfig(k=4, h=h, strategy="hash-rolling")
        reset = GoldfishConfig(k=4, h=h, boundary_id=eos)
        assert torch.equal(apply_goldfish(labels, cfg), official_apply_goldfish(labels, 4, h, table))
        assert torch.equal(goldfish_mask(labels, cfg)[:, h - 1:], official_mask(labels, 4, h, table))
        times = time_interleaved(
            {
                "official mask": lambda: official_mask(labels, 4, h, table),
                "official apply": lambda: official_apply_goldfish(labels, 4, h, table),
                "apply": lambda: apply_goldfish(labels, cfg),
                "mask": lambda: goldfish_mask(labels, cfg),
                "rolling mask": lambda: goldfish_mask(labels, rolling),
                "reset mask": lambda: goldfish_mask(labels, reset),
            },
            args.device,
            args.repeats,
            calls=args.calls,
        )
        mtok = {name: B * T / t / 1e6 for name, t in times.items()}
        rows.append([h, f"{mtok['official mask']:.1f}", f"{mtok['mask']:.1f}", f"{mtok['official apply']:.1f}",
                     f"{mtok['apply']:.1f}", f"{mtok['rolling mask']:.1f}", f"{mtok['reset mask']:.1f}",
                     f"{mtok['mask'] / mtok['official mask']:.1f}x", f"{mtok['apply'] / mtok['official apply']:.1f}x",
                     f"{times['reset mask'] / times['mask'] - 1:+.0%}"])
    print(f"device={args.device} labels={B}x{T} k=4 repeats={args.repeats} calls={args.calls} "
          f"document={args.document} (M tokens/s, median)")
    print_table(["h", "official mask", "ours goldfish_mask", "official apply_goldfish", "ours apply_goldfish",
                 "ours hash-rolling mask", "ours reset mask", "mask vs official", "apply vs official",
                 "reset vs mask time"], rows)


if __name__ == "__main__":
    main()
