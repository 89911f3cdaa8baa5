"""Packed token shards on disk and the rows a training step reads from them.

Layout of a data directory: `tokens_00000.bin` ... (the concatenated documents' ids, uint16 when the
vocabulary fits, else uint32), `docs_00000.npy` ... (each document's start offset in its shard), and
`manifest.json` (dtype, vocabulary size, per-shard token counts and sha256), written last and atomically,
so a directory with a manifest is complete. Rows are windows of seq_len + 1 tokens (inputs and shifted
targets) at multiples of seq_len, never crossing a shard.

Canary documents (the documents whose memorization an experiment measures) are not packed: each sits at
the start of its own row of seq_len + 1 positions, truncated to fit and padded with PADDING. The rows are
stored once, in `canary_rows.bin` (int32, [num_docs, seq_len + 1]), with `canary.jsonl` (per document its
text and the exact ids in its row), and the dataset serves the set `repeats` times after the packed rows.

An SFT directory (write_sft_shards) is the same plus `supervised_00000.bin` ... beside the token shards (uint8,
one per token: 1 where the token is a target that counts, the responses; listed in the manifest with their
sha256) and the manifest's "sft" entry. Its examples are packed back to back, or each fills its own row
(row_seq_len: the seq_len it was written for, then the only one it can be read with).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from goldfish_ds.files import sha256_file

MANIFEST = "manifest.json"
CANARY_ROWS = "canary_rows.bin"
CANARY_TEXTS = "canary.jsonl"
PADDING = -1  # the id at padding positions of a row; never a token, so never a label


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _checked_ids(doc: list[int], vocab_size: int) -> np.ndarray:
    ids = np.asarray(doc, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"write_packed_shards: token ids must be in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    return ids


@dataclass
class CanarySet:
    """Documents to place one per row (truncated to seq_len + 1 ids, padded), the set repeated `repeats` times.

    texts[i] is the original text of documents[i], which is tokenized like the background (BOS + ids + EOS).
    """

    texts: list[str]
    documents: list[list[int]]
    seq_len: int
    repeats: int = 1

    def __post_init__(self) -> None:
        if not self.documents or len(self.texts) != len(self.documents):
            raise ValueError(f"CanarySet: needs one text per document and at least one document, got "
                             f"{len(self.texts)} texts and {len(self.documents)} documents")
        if self.seq_len < 1:
            raise ValueError(f"CanarySet: seq_len must be >= 1, got {self.seq_len}")
        if self.repeats < 1:
            raise ValueError(f"CanarySet: repeats must be >= 1, got {self.repeats}")


def _write_canary(root: Path, canary: CanarySet, vocab_size: int) -> dict:
    if vocab_size > np.iinfo(np.int32).max + 1:
        raise ValueError(f"write_packed_shards: canary rows are int32, vocab_size {vocab_size} does not fit")
    width = canary.seq_len + 1
    rows = np.full((len(canary.documents), width), PADDING, dtype=np.int32)
    with (root / CANARY_TEXTS).open("w", encoding="utf-8") as f:
        for row, (text, doc) in enumerate(zip(canary.texts, canary.documents)):
            ids = _checked_ids(doc, vocab_size)[:width]
            rows[row, :ids.size] = ids
            f.write(json.dumps({"text": text, "ids": ids.tolist()}, ensure_ascii=False) + "\n")
    rows.tofile(root / CANARY_ROWS)
    return {"rows": CANARY_ROWS, "dtype": rows.dtype.name, "sha256": sha256_file(root / CANARY_ROWS),
            "texts": CANARY_TEXTS, "texts_sha256": sha256_file(root / CANARY_TEXTS), "seq_len": canary.seq_len,
            "num_docs": len(canary.documents), "repeats": canary.repeats,
            "num_truncated": sum(len(doc) > width for doc in canary.documents)}


def _write_shards(root: Path, documents: Iterable[tuple[np.ndarray, np.ndarray | None]], dtype: np.dtype,
                  shard_tokens: int, tail: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
    """Shards of about shard_tokens tokens from (ids, supervised) pairs (supervised None: no supervision file);
    `tail` (ids, supervised) ends every shard."""
    shards: list[dict] = []
    buffer: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    starts: list[int] = []
    count = 0

    def flush() -> None:
        nonlocal buffer, flags, starts, count
        if not buffer:
            return
        if tail is not None:
            buffer.append(tail[0])
            flags.append(tail[1])
            count += tail[0].size
        index = len(shards)
        tokens_path = root / f"tokens_{index:05d}.bin"
        np.concatenate(buffer).astype(dtype).tofile(tokens_path)
        np.save(root / f"docs_{index:05d}.npy", np.asarray(starts, dtype=np.int64))
        shard = {"tokens": tokens_path.name, "docs": f"docs_{index:05d}.npy", "num_tokens": count,
                 "num_docs": len(starts), "sha256": sha256_file(tokens_path)}
        if flags:
            supervised_path = root / f"supervised_{index:05d}.bin"
            np.concatenate(flags).astype(np.uint8).tofile(supervised_path)
            shard.update(supervised=supervised_path.name, supervised_sha256=sha256_file(supervised_path))
        shards.append(shard)
        buffer, flags, starts, count = [], [], [], 0

    for ids, supervised in documents:
        starts.append(count)
        buffer.append(ids)
        if supervised is not None:
            flags.append(supervised)
        count += ids.size
        if count >= shard_tokens:
            flush()
    flush()
    return shards


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)  # atomic: a directory with a manifest is complete


def _new_directory(out_dir: str) -> Path:
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # an old manifest must not describe half-rewritten files
    return root


def _manifest(dtype: np.dtype, vocab_size: int, shards: list[dict], **extra) -> dict:
    return {"format": "goldfish_ds.packed/1", "dtype": dtype.name, "vocab_size": vocab_size, "shards": shards,
            "num_tokens": sum(s["num_tokens"] for s in shards), "num_docs": sum(s["num_docs"] for s in shards),
            **extra}


def write_packed_shards(documents: Iterable[list[int]], out_dir: str, vocab_size: int,
                        shard_tokens: int = 1 << 26, canary: CanarySet | None = None) -> dict:
    """Write documents (lists of ids in [0, vocab_size)) as packed shards of about shard_tokens tokens.

    With `canary`, also write its rows and texts (see the module docstring); the manifest's "canary" entry
    (None without) records seq_len, num_docs, repeats and num_truncated. Returns the manifest.
    """
    root = _new_directory(out_dir)
    dtype = _dtype_for(vocab_size)
    shards = _write_shards(root, ((_checked_ids(doc, vocab_size), None) for doc in documents), dtype, shard_tokens)
    manifest = _manifest(dtype, vocab_size, shards,
                         canary=_write_canary(root, canary, vocab_size) if canary is not None else None)
    _write_manifest(root, manifest)
    return manifest


def write_sft_shards(examples: Iterable[tuple[list[int], list[bool]]], out_dir: str, vocab_size: int, *,
                     sft_format: str, seq_len: int | None, pad_id: int, shard_tokens: int = 1 << 26) -> dict:
    """Write SFT examples ((ids, supervised) pairs: supervised[i] says whether ids[i] is a target that counts) as
    shards with a per-token supervision file each (see the module docstring).

    seq_len None packs the examples back to back; otherwise each example fills its own row: cut to its first
    seq_len ids when longer (counted as num_truncated), then padded with pad_id (unsupervised) to seq_len ids,
    so that row r (ids [r seq_len, r seq_len + seq_len + 1)) holds example r and, last, the first id of the next
    (unsupervised). The manifest's "sft" entry records sft_format, row_seq_len (seq_len), num_examples,
    num_truncated, num_truncated_to_nothing (no supervised id left) and supervised_tokens. Returns the manifest.
    """
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"write_sft_shards: seq_len must be >= 1 or None (packed), got {seq_len}")
    root = _new_directory(out_dir)
    dtype = _dtype_for(vocab_size)
    pad = _checked_ids([pad_id], vocab_size)
    counts = {"num_examples": 0, "num_truncated": 0, "num_truncated_to_nothing": 0, "supervised_tokens": 0}

    def rows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, supervised in examples:
            ids, flags = _checked_ids(ids, vocab_size), np.asarray(supervised, dtype=bool)
            if flags.shape != ids.shape:
                raise ValueError(f"write_sft_shards: example {counts['num_examples']} has {ids.size} ids but "
                                 f"{flags.size} supervision flags")
            counts["num_examples"] += 1
            if seq_len is not None:
                if ids.size > seq_len:
                    counts["num_truncated"] += 1
                    counts["num_truncated_to_nothing"] += int(flags.any() and not flags[:seq_len].any())
                    ids, flags = ids[:seq_len], flags[:seq_len]
                ids = np.concatenate([ids, np.repeat(pad, seq_len - ids.size)])
                flags = np.concatenate([flags, np.zeros(seq_len - flags.size, dtype=bool)])
            counts["supervised_tokens"] += int(flags.sum())
            yield ids, flags

    tail = None if seq_len is None else (pad, np.zeros(1, dtype=bool))  # completes every shard's last row
    shards = _write_shards(root, rows(), dtype, shard_tokens, tail)
    manifest = _manifest(dtype, vocab_size, shards, canary=None,
                         sft={"format": sft_format, "row_seq_len": seq_len, "pad_id": pad_id, **counts})
    _write_manifest(root, manifest)
    return manifest


def _check_file(path: Path, sha256: str, verify: bool, num_bytes: int | None = None) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} listed in the manifest is missing")
    if num_bytes is not None and path.stat().st_size != num_bytes:
        raise ValueError(f"data file {path} is corrupt: {path.stat().st_size} bytes, the manifest says {num_bytes}")
    if verify and sha256_file(path) != sha256:
        raise ValueError(f"data file {path} is corrupt: its sha256 differs from the manifest's")


class PackedTokenDataset(torch.utils.data.Dataset):
    """Rows of seq_len + 1 token ids (int64) from a packed directory, memory-mapped.

    Rows [0, num_packed_rows) are the packed documents; then come the canary rows, the whole set once per
    repeat, each holding one document from its first position and PADDING after it. An SFT directory also
    serves each row's supervision (supervised(row)); `sft` is its manifest entry (None for pretraining data).
    verify=True checks every file's sha256 against the manifest (reads everything once); the sizes are always
    checked, so a missing or truncated file is a clear error before training starts.
    """

    def __init__(self, data_dir: str, seq_len: int, verify: bool = False) -> None:
        root = Path(data_dir)
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"{data_dir!r} has no {MANIFEST}: not a packed data directory "
                                    "(make one with scripts/prepare_data.py)")
        if seq_len < 1:
            raise ValueError(f"PackedTokenDataset: seq_len must be >= 1, got {seq_len}")
        self.manifest = json.loads((root / MANIFEST).read_text())
        self.seq_len = seq_len
        self.vocab_size = self.manifest["vocab_size"]
        dtype = np.dtype(self.manifest["dtype"])
        self._shards, self._first_row = [], [0]
        for shard in self.manifest["shards"]:
            path = root / shard["tokens"]
            _check_file(path, shard["sha256"], verify, shard["num_tokens"] * dtype.itemsize)
            tokens = np.memmap(path, dtype=dtype, mode="r")
            self._shards.append(tokens)
            self._first_row.append(self._first_row[-1] + max(0, (len(tokens) - 1) // seq_len))
        self.num_packed_rows = self._first_row[-1]
        self.sft = self.manifest.get("sft")  # None for pretraining data
        self._supervised = []
        if self.sft is not None:
            if self.sft["row_seq_len"] not in (None, seq_len):
                raise ValueError(f"{data_dir!r} holds one SFT example per row of seq_len {self.sft['row_seq_len']}, "
                                 f"not the requested seq_len {seq_len}: prepare the data again with --seq_len "
                                 f"{seq_len} (or with --pack)")
            for shard in self.manifest["shards"]:
                path = root / shard["supervised"]
                _check_file(path, shard["supervised_sha256"], verify, shard["num_tokens"])
                self._supervised.append(np.memmap(path, dtype=np.uint8, mode="r"))
        self._canary, self._canary_repeats = None, 0
        canary = self.manifest.get("canary")
        if canary is not None:
            if canary["seq_len"] != seq_len:
                raise ValueError(f"{data_dir!r} holds canary rows of seq_len {canary['seq_len']}, not the requested "
                                 f"seq_len {seq_len}: prepare the data again with --seq_len {seq_len}")
            rows_dtype = np.dtype(canary["dtype"])
            path = root / canary["rows"]
            _check_file(path, canary["sha256"], verify, canary["num_docs"] * (seq_len + 1) * rows_dtype.itemsize)
            _check_file(root / canary["texts"], canary["texts_sha256"], verify)
            self._canary = np.memmap(path, dtype=rows_dtype, mode="r", shape=(canary["num_docs"], seq_len + 1))
            self._canary_repeats = canary["repeats"]

    def __len__(self) -> int:
        return self.num_packed_rows + (len(self._canary) * self._canary_repeats if self._canary is not None else 0)

    def _locate(self, row: int) -> tuple[int, int]:
        """(shard, first token) of a packed row."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._first_row, row, side="right")) - 1
        return shard, (row - self._first_row[shard]) * self.seq_len

    def __getitem__(self, row: int) -> torch.Tensor:
        if row >= self.num_packed_rows and 0 <= row < len(self):
            return torch.from_numpy(self._canary[(row - self.num_packed_rows) % len(self._canary)].astype(np.int64))
        shard, start = self._locate(row)
        return torch.from_numpy(self._shards[shard][start:start + self.seq_len + 1].astype(np.int64))

    def supervised(self, row: int) -> torch.Tensor:
        """bool [seq_len + 1]: whether each id of row `row` is a supervised target (SFT data; only meaningful
        from position 1, the targets). Pretraining data: every id except PADDING."""
        if self.sft is None or (row >= self.num_packed_rows and 0 <= row < len(self)):
            return self[row] != PADDING
        shard, start = self._locate(row)
        return torch.from_numpy(self._supervised[shard][start:start + self.seq_len + 1].astype(bool))


@dataclass
class ShardedSampler:
    """Row order for one data-parallel rank: a seeded permutation per epoch, split across ranks, resumable.

    Every rank draws the same permutation of all rows (seed + epoch) and cuts it into global batches of
    micro_batch_size x accumulation_steps x dp_size rows (the remainder of an epoch is skipped, so ranks
    step in lockstep). Within a global batch, micro-batch `a` of rank `d` is the slot a x dp_size + d:
    the same rows, grouped into the same micro-batches, whatever the split between accumulation and
    data parallelism, so layouts train identically. Ranks never share a row; `state_dict` /
    `load_state_dict` resume exactly.
    """

    num_rows: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    micro_batch_size: int = 1
    accumulation_steps: int = 1
    epoch: int = 0
    position: int = 0  # rows of this rank already taken in the current epoch

    def __post_init__(self) -> None:
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"ShardedSampler: dp_rank must be in [0, {self.dp_size}), got {self.dp_rank}")
        if self.micro_batch_size < 1 or self.accumulation_steps < 1:
            raise ValueError(f"ShardedSampler: micro_batch_size and accumulation_steps must be >= 1, got "
                             f"{self.micro_batch_size} and {self.accumulation_steps}")
        if self.num_rows < self.global_batch:
            raise ValueError(f"ShardedSampler: {self.num_rows} rows cannot fill one global batch of "
                             f"{self.global_batch} rows ({self.micro_batch_size} per micro-batch x "
                             f"{self.accumulation_steps} accumulation steps x {self.dp_size} data-parallel ranks)")

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.dp_size

    def _epoch_rows(self) -> torch.Tensor:
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        steps = self.num_rows // self.global_batch
        blocks = order[:steps * self.global_batch].view(steps, self.accumulation_steps, self.dp_size,
                                                        self.micro_batch_size)
        return blocks[:, :, self.dp_rank].reshape(-1)

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
