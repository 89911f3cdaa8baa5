"""`goldfish_ds` command: report the compiled kernels, or write a hash table drawn on some device."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from goldfish_ds import __version__
from goldfish_ds.kernels import compiled_backends, cpu_capability
from goldfish_ds.table import generate_table, save_table


def _info(_: argparse.Namespace) -> int:
    print(f"goldfish_ds {__version__}  torch {torch.__version__}")
    print(f"compiled kernels: {', '.join(compiled_backends())}  (CPU SIMD: {cpu_capability()})")
    print(f"CUDA device visible: {torch.cuda.is_available()}")
    return 0


def _table(args: argparse.Namespace) -> int:
    save_table(generate_table(args.device), args.out)
    print(f"wrote the hash-table strategy's table drawn on {args.device} to {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="goldfish_ds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which kernels this build contains").set_defaults(run=_info)
    table = commands.add_parser(
        "table",
        help="write the official hash table (seed 2971215073) drawn on a device, for GoldfishConfig(table_path=...)",
        description="The official code draws its table on the device that first sees the labels, so a run "
        "trained on GPUs used a GPU-drawn table. Write that table here to reproduce its masks bit-exactly.",
    )
    table.add_argument("--device", default="cpu", help="device to draw on, e.g. cpu or cuda (default: cpu)")
    table.add_argument("--out", required=True, help="output file (raw little-endian float32)")
    table.set_defaults(run=_table)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
