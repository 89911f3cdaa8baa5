"""Goldfish mask throughput (M tokens/s): the compiled kernels vs the official implementation's torch ops.

The official hash-table mask multiplies each window with `unfold(...).prod(-1)`, takes it modulo the table
size, looks the table up and compares with 1/k; `official` below does exactly those torch operations on
the same labels. Usage: python benchmarks/bench_mask.py [--device cpu|cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_interleaved  # noqa: E402

from goldfish_ds import GoldfishConfig, goldfish_mask  # noqa: E402
from goldfish_ds.table import TABLE_SIZE, hash_table  # noqa: E402


def official_hash_table_mask(labels: torch.Tensor, k: int, h: int, table: torch.Tensor) -> torch.Tensor:
    dropped = torch.zeros_like(labels, dtype=torch.bool)
    dropped[:, h - 1:] = table[labels.unfold(1, h, 1).prod(dim=-1) % TABLE_SIZE] < 1 / k
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", default="16x4096", help="BxT labels per call (default 16x4096)")
    args = parser.parse_args()
    B, T = map(int, args.batch.split("x"))
    labels = torch.randint(0, 32000, (B, T), device=args.device)
    table = hash_table().to(args.device)
    rows = []
    for h in (13, 50):
        cfg = GoldfishConfig(k=4, h=h)
        assert torch.equal(goldfish_mask(labels, cfg), official_hash_table_mask(labels, 4, h, table))
        times = time_interleaved(
            {
                "official": lambda: official_hash_table_mask(labels, 4, h, table),
                "hash-table": lambda: goldfish_mask(labels, cfg),
                "hash-rolling": lambda: goldfish_mask(labels, GoldfishConfig(k=4, h=h, strategy="hash-rolling")),
            },
            args.device,
            args.repeats,
        )
        mtok = {name: B * T / t / 1e6 for name, t in times.items()}
        rows.append([h, f"{mtok['official']:.1f}", f"{mtok['hash-table']:.1f}", f"{mtok['hash-rolling']:.1f}",
                     f"{mtok['hash-table'] / mtok['official']:.1f}x"])
    print(f"device={args.device} labels={B}x{T} k=4 repeats={args.repeats} (M tokens/s, median)")
    print_table(["h", "official", "ours hash-table", "ours hash-rolling", "hash-table vs official"], rows)


if __name__ == "__main__":
    main()
