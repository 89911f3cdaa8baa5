"""Packed token shards on disk and the rows a training step reads from them.

Layout of a data directory: `tokens_00000.bin` ... (the concatenated documents' ids, uint16 when the
vocabulary fits, else uint32), `docs_00000.npy` ... (each document's start offset in its shard), and
`manifest.json` (dtype, vocabulary size, per-shard token counts and sha256), written last and atomically,
so a directory with a manifest is complete. Rows are windows of seq_len + 1 tokens (inputs and shifted
targets) at multiples of seq_len, never crossing a shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List

import numpy as np
import torch

MANIFEST = "manifest.json"


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_packed_shards(documents: Iterable[List[int]], out_dir: str, vocab_size: int,
                        shard_tokens: int = 1 << 26) -> dict:
    """Write documents (lists of ids in [0, vocab_size)) as packed shards of about shard_tokens tokens."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    dtype = _dtype_for(vocab_size)
    shards: List[Dict] = []
    buffer: List[np.ndarray] = []
    starts: List[int] = []
    count = 0

    def flush() -> None:
        nonlocal buffer, starts, count
        if not buffer:
            return
        index = len(shards)
        tokens_path = root / f"tokens_{index:05d}.bin"
        np.concatenate(buffer).astype(dtype).tofile(tokens_path)
        np.save(root / f"docs_{index:05d}.npy", np.asarray(starts, dtype=np.int64))
        shards.append({"tokens": tokens_path.name, "docs": f"docs_{index:05d}.npy", "num_tokens": count,
                       "num_docs": len(starts), "sha256": _sha256(tokens_path)})
        buffer, starts, count = [], [], 0

    for doc in documents:
        ids = np.asarray(doc, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"write_packed_shards: token ids must be in [0, {vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        starts.append(count)
        buffer.append(ids)
        count += ids.size
        if count >= shard_tokens:
            flush()
    flush()
    manifest = {"format": "goldfish_ds.packed/1", "dtype": dtype.name, "vocab_size": vocab_size, "shards": shards,
                "num_tokens": sum(s["num_tokens"] for s in shards), "num_docs": sum(s["num_docs"] for s in shards)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)  # atomic: a directory with a manifest is complete
    return manifest


class PackedTokenDataset(torch.utils.data.Dataset):
    """Rows of seq_len + 1 token ids (int64) from a packed directory, memory-mapped.

    verify=True checks every shard's sha256 against the manifest (reads everything once); the sizes are
    always checked, so a missing or truncated shard is a clear error before training starts.
    """

    def __init__(self, data_dir: str, seq_len: int, verify: bool = False) -> None:
        root = Path(data_dir)
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"{data_dir!r} has no {MANIFEST}: not a packed data directory "
                                    "(make one with scripts/prepare_data.py)")
        self.manifest = json.loads((root / MANIFEST).read_text())
        self.seq_len = seq_len
        self.vocab_size = self.manifest["vocab_size"]
        dtype = np.dtype(self.manifest["dtype"])
        self._shards, self._first_row = [], [0]
        for shard in self.manifest["shards"]:
            path = root / shard["tokens"]
            if not path.is_file():
                raise FileNotFoundError(f"data shard {path} listed in the manifest is missing")
            if path.stat().st_size != shard["num_tokens"] * dtype.itemsize:
                raise ValueError(f"data shard {path} is corrupt: {path.stat().st_size} bytes, the manifest says "
                                 f"{shard['num_tokens'] * dtype.itemsize}")
            if verify and _sha256(path) != shard["sha256"]:
                raise ValueError(f"data shard {path} is corrupt: its sha256 differs from the manifest's")
            tokens = np.memmap(path, dtype=dtype, mode="r")
            self._shards.append(tokens)
            self._first_row.append(self._first_row[-1] + max(0, (len(tokens) - 1) // seq_len))

    def __len__(self) -> int:
        return self._first_row[-1]

    def __getitem__(self, row: int) -> torch.Tensor:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._first_row, row, side="right")) - 1
        start = (row - self._first_row[shard]) * self.seq_len
        return torch.from_numpy(self._shards[shard][start:start + self.seq_len + 1].astype(np.int64))


@dataclass
class ShardedSampler:
    """Row order for one data-parallel rank: a seeded permutation per epoch, split across ranks, resumable.

    Every rank draws the same permutation of all rows (seed + epoch) and takes every dp_size-th row
    starting at dp_rank, so ranks never share a row; `state_dict` / `load_state_dict` resume exactly.
    """

    num_rows: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    epoch: int = 0
    position: int = 0  # rows of this rank already taken in the current epoch

    def __post_init__(self) -> None:
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"ShardedSampler: dp_rank must be in [0, {self.dp_size}), got {self.dp_rank}")
        if self.num_rows < self.dp_size:
            raise ValueError(f"ShardedSampler: {self.num_rows} rows cannot feed {self.dp_size} data-parallel ranks")

    def _epoch_rows(self) -> torch.Tensor:
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        per_rank = self.num_rows // self.dp_size  # equal shares, so ranks step in lockstep
        return order[self.dp_rank::self.dp_size][:per_rank]

    def __iter__(self) -> Iterator[int]:
        while True:
            rows = self._epoch_rows()
            while self.position < len(rows):
                self.position += 1
                yield int(rows[self.position - 1])
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"ShardedSampler: the checkpoint's data seed {state['seed']} differs from {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
