"""The official hash-table strategy's table: 1,000,003 float32 values from a seeded torch.rand.

The official code draws it on whatever device first sees the labels, so its CPU and GPU masks differ.
We draw it on the CPU (identical masks on every device) and accept a file for bit-exact reproduction
of runs whose table was drawn elsewhere (`python -m goldfish_ds table --device cuda --out FILE`).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

TABLE_SIZE = 1_000_003
TABLE_SEED = 2971215073  # the official seed (Fibonacci number F47, a prime)


def generate_table(device: str = "cpu") -> torch.Tensor:
    """Draw the official table with the official generator on `device`; returned on the CPU."""
    generator = torch.Generator(device=device)
    generator.manual_seed(TABLE_SEED)
    return torch.rand(TABLE_SIZE, device=device, generator=generator).cpu()


def load_table(path: str) -> torch.Tensor:
    """Read a table file: raw little-endian float32 (4,000,012 bytes) or a tensor saved by torch.save."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"goldfish table_path {path!r} does not exist")
    if file.stat().st_size == 4 * TABLE_SIZE:
        table = torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.float32)
    else:
        table = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(table, torch.Tensor):
            raise ValueError(f"goldfish table file {path!r} must hold a tensor, got {type(table).__name__}")
    if table.dtype != torch.float32 or table.numel() != TABLE_SIZE:
        raise ValueError(f"goldfish table file {path!r} must hold {TABLE_SIZE} float32 values, "
                         f"got {table.numel()} values of {table.dtype}")
    return table.reshape(-1).contiguous()


def save_table(table: torch.Tensor, path: str) -> None:
    """Write a table as raw little-endian float32."""
    Path(path).write_bytes(table.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())


@lru_cache(maxsize=None)
def hash_table(path: Optional[str] = None) -> torch.Tensor:
    """The float32 table for `path` (None: the official table drawn on the CPU), on the CPU, cached."""
    return generate_table("cpu") if path is None else load_table(path)


@torch.compiler.disable  # a cached lookup, not something to trace
@lru_cache(maxsize=None)
def hash_table_bits(device: torch.device, k: int, path: Optional[str] = None) -> torch.Tensor:
    """What the kernels read: bit i of int64 word i // 64 is table[i] < float32(1/k). Cached per device."""
    dropped = hash_table(path) < torch.tensor(1 / k, dtype=torch.float32)  # the official float32 comparison
    padded = torch.zeros(-(-TABLE_SIZE // 64) * 64, dtype=torch.int64)
    padded[:TABLE_SIZE] = dropped.to(torch.int64)
    weights = torch.ones(64, dtype=torch.int64) << torch.arange(64)  # bit 63 wraps to the sign bit, as wanted
    return (padded.reshape(-1, 64) * weights).sum(dim=1).to(device)
