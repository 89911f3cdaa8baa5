"""Pure-torch reference of the goldfish masks, for tests and debugging only (slow; never the default path).

It follows the definitions directly (each window recomputed from scratch, 64-bit arithmetic emulated in
int64 with logical shifts), independently of the compiled kernels' rolling and blocked algorithms.
"""
from __future__ import annotations

from typing import Optional

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.table import TABLE_SIZE, hash_table

_MASK64 = (1 << 64) - 1


def _i64(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of uint64 values stored in int64."""
    return (x >> bits) & _i64((1 << (64 - bits)) - 1)


def _fmix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 33)
    x = x * _i64(0xFF51AFD7ED558CCD)
    x = x ^ _shr(x, 33)
    x = x * _i64(0xC4CEB9FE1A85EC53)
    return x ^ _shr(x, 33)


def _ult(a: torch.Tensor, b: int) -> torch.Tensor:
    """Unsigned 64-bit a < b, for int64-stored values (flip the sign bit, compare signed)."""
    flip = _i64(1 << 63)
    return (a ^ flip) < _i64((b & _MASK64) ^ (1 << 63))


def _official_hashint32(key: torch.Tensor) -> torch.Tensor:
    mask = 0xFFFFFFFF
    key = (~key + (key << 21)) & mask
    key = (key << 21) - key - 1
    key = key ^ _shr(key, 24)
    key = ((key + (key << 3)) + (key << 8)) & mask
    key = key * 265
    key = key ^ _shr(key, 14)
    key = ((key + (key << 2)) + (key << 4)) & mask
    key = key * 21
    key = key ^ _shr(key, 28)
    return (key + (key << 31)) & mask


def _windows(rows: torch.Tensor, cfg: GoldfishConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, h] windows (window[b, t, j] = rows[b, end - j]) and [T] whether each lies inside the row."""
    T = rows.shape[1]
    t = torch.arange(T, device=rows.device)
    end = t - 1 if cfg.window == "preceding" else t
    idx = end[:, None] - torch.arange(cfg.h, device=rows.device)[None, :]  # idx[t, j] = end - j
    return rows[:, idx.clamp(min=0)], (end - cfg.h + 1 >= 0)


def reference_goldfish_mask(labels: torch.Tensor, cfg: GoldfishConfig, step: int = 0, *,
                             window_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract as goldfish_ds.goldfish_mask, written in plain torch.

    The windows (and the boundaries) are read in window_ids when given, else in labels; labels decide which
    targets count (ignore_index, exempt ids). With cfg.boundary_id, each row is cut after every id equal to it and
    each segment is masked as a row of its own (the random strategy, which depends on (row, position) only, masks
    the whole row as without it).
    """
    labels_rows = labels.reshape(1, -1) if labels.dim() == 1 else labels
    rows = labels_rows if window_ids is None else window_ids.reshape(labels_rows.shape)
    if cfg.boundary_id is None or cfg.strategy == "random" or rows.numel() == 0:
        dropped = _rows_mask(rows, cfg, step)
    else:
        segmented = []
        for row in rows:
            ends = (row == cfg.boundary_id).nonzero().flatten() + 1  # a segment ends right after each boundary
            cuts = [0, *[int(e) for e in ends if e < row.numel()], row.numel()]
            segmented.append(torch.cat([_rows_mask(row[None, a:b], cfg, step)[0] for a, b in zip(cuts, cuts[1:])]))
        dropped = torch.stack(segmented)
    dropped = dropped & (labels_rows != cfg.ignore_index)
    if cfg.exempt_ids:
        dropped = dropped & ~torch.isin(labels_rows, torch.tensor(cfg.exempt_ids, device=rows.device))
    return dropped.reshape(labels.shape)


def _rows_mask(rows: torch.Tensor, cfg: GoldfishConfig, step: int) -> torch.Tensor:
    """The mask of rows [B, T], each row one sequence, before the exempt ids (cfg.boundary_id not applied)."""
    B, T = rows.shape
    t = torch.arange(T, device=rows.device).expand(B, T)
    threshold64 = _MASK64 // cfg.k
    if cfg.strategy == "static":
        dropped = (t >= cfg.start_position) & ((t - cfg.start_position) % cfg.k == 0)
    elif cfg.strategy == "random":
        row = torch.arange(B, device=rows.device)[:, None].expand(B, T)
        step_mix = _fmix64(torch.tensor(_i64(step + 0x632BE59BD9B4E019), device=rows.device))
        key = _fmix64(torch.tensor(_i64(cfg.seed), device=rows.device) ^ step_mix) ^ _fmix64((row << 32) ^ t)
        dropped = _ult(_fmix64(key), threshold64)
    else:
        win, inside = _windows(rows, cfg)
        if cfg.strategy == "hash-rolling":
            mixed = _fmix64(win ^ _i64(0x9E3779B97F4A7C15))
            powers = torch.tensor([_i64(pow(0xD6E8FEB86659FD93, j, 1 << 64)) for j in range(cfg.h)],
                                  device=rows.device)
            value = (mixed * powers).sum(-1)  # int64 sums wrap like uint64
            dropped = _ult(_fmix64(value ^ cfg.h), threshold64)
        else:
            product = win.prod(-1)  # wraps like the official int64 product
            if cfg.strategy == "hash-table":
                table = hash_table(cfg.table_path).to(rows.device)
                dropped = table[torch.remainder(product, TABLE_SIZE)] < torch.tensor(1 / cfg.k, dtype=torch.float32)
            else:  # hash-avalanche: float32 comparison, as the official code's tensor-vs-float compare
                hashed = _official_hashint32(product).to(torch.float32)
                dropped = hashed < torch.tensor(((1 << 32) - 1) / cfg.k, dtype=torch.float32)
        dropped = dropped & inside
    return dropped & (rows != cfg.ignore_index)
