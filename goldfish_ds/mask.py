"""Goldfish masks: which target positions the loss leaves out."""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.kernels import check_device_supported, ops
from goldfish_ds.table import hash_table_bits


def _as_rows(labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"goldfish_ds: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"goldfish_ds: labels must be int64 (torch.long), got {labels.dtype}")
    if labels.dim() not in (1, 2):
        raise ValueError(f"goldfish_ds: labels must be [T] or [B, T], got shape {tuple(labels.shape)}")
    return labels.reshape(1, -1) if labels.dim() == 1 else labels.contiguous()


@torch.compiler.disable  # a cached lookup, not something to trace
@lru_cache(maxsize=64)
def _exempt_tensor(ids: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64, device=device)  # sorted by GoldfishConfig


def _run(op, labels: torch.Tensor, cfg: GoldfishConfig, step: int) -> torch.Tensor:
    """Calls a mask operator (goldfish_mask or apply_goldfish: same arguments) on labels' rows."""
    rows = _as_rows(labels)
    check_device_supported(rows.device)
    table_bits = hash_table_bits(rows.device, cfg.k, cfg.table_path) if cfg.strategy == "hash-table" else None
    exempt = _exempt_tensor(cfg.exempt_ids, rows.device) if cfg.exempt_ids else None
    out = op(rows, cfg.strategy_code, cfg.k, cfg.h, cfg.start_position, cfg.ignore_index, cfg.window == "preceding",
             table_bits, exempt, cfg.seed, step, cfg.boundary_id)
    return out if labels.dim() == 2 else out.reshape(-1)  # (reshape(labels.shape) costs ~4 us a call)


def goldfish_mask(labels: torch.Tensor, cfg: GoldfishConfig, step: int = 0) -> torch.Tensor:
    """Positions the goldfish loss drops (True = dropped), computed per row.

    labels: [B, T] or [T] int64, the shifted targets (labels[b, t] is predicted from tokens <= t).
    Positions whose label is cfg.ignore_index or in cfg.exempt_ids are never dropped.
    step: only the "random" strategy uses it (a new mask every step).
    Returns a bool tensor of labels' shape, on labels' device.
    """
    return _run(ops.goldfish_mask, labels, cfg, step)


def apply_goldfish(labels: torch.Tensor, cfg: GoldfishConfig, step: int = 0) -> torch.Tensor:
    """A copy of `labels` with the dropped positions set to cfg.ignore_index (one pass on the CPU).

    Use it to feed any loss that honours ignore_index (HF models, torch's cross_entropy);
    goldfish_cross_entropy does the same inside its fused kernel.
    """
    return _run(ops.apply_goldfish, labels, cfg, step)
