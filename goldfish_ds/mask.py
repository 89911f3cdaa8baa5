"""Goldfish masks: which target positions the loss leaves out."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

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


def _window_rows(window_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(window_ids, torch.Tensor) or window_ids.dtype != torch.int64:
        raise TypeError("goldfish_ds: window_ids must be an int64 tensor (torch.long), got "
                        f"{window_ids.dtype if isinstance(window_ids, torch.Tensor) else type(window_ids).__name__}")
    if window_ids.shape != labels.shape or window_ids.device != labels.device:
        raise ValueError(f"goldfish_ds: window_ids must have labels' shape {tuple(labels.shape)} and device "
                         f"{labels.device}, got {tuple(window_ids.shape)} on {window_ids.device}")
    return _as_rows(window_ids)


def _run(op, labels: torch.Tensor, cfg: GoldfishConfig, step: int, window_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Calls a mask operator (goldfish_mask or apply_goldfish: same arguments) on labels' rows; with window_ids,
    the goldfish_mask operator on window_ids' rows, restricted to the targets labels count."""
    rows = _as_rows(labels)
    check_device_supported(rows.device)
    table_bits = hash_table_bits(rows.device, cfg.k, cfg.table_path) if cfg.strategy == "hash-table" else None
    exempt = _exempt_tensor(cfg.exempt_ids, rows.device) if cfg.exempt_ids else None
    if window_ids is None:
        out = op(rows, cfg.strategy_code, cfg.k, cfg.h, cfg.start_position, cfg.ignore_index,
                 cfg.window == "preceding", table_bits, exempt, cfg.seed, step, cfg.boundary_id)
    else:  # hash window_ids; labels decide which targets count (ignore_index, exempt ids)
        dropped = ops.goldfish_mask(_window_rows(window_ids, labels), cfg.strategy_code, cfg.k, cfg.h,
                                    cfg.start_position, cfg.ignore_index, cfg.window == "preceding", table_bits,
                                    None, cfg.seed, step, cfg.boundary_id) & rows.ne(cfg.ignore_index)
        if exempt is not None:
            dropped &= ~torch.isin(rows, exempt)
        out = dropped if op is ops.goldfish_mask else rows.masked_fill(dropped, cfg.ignore_index)
    return out if labels.dim() == 2 else out.reshape(-1)  # (reshape(labels.shape) costs ~4 us a call)


def goldfish_mask(labels: torch.Tensor, cfg: GoldfishConfig, step: int = 0, *,
                  window_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positions the goldfish loss drops (True = dropped), computed per row.

    labels: [B, T] or [T] int64, the shifted targets (labels[b, t] is predicted from tokens <= t).
    Positions whose label is cfg.ignore_index or in cfg.exempt_ids are never dropped.
    step: only the "random" strategy uses it (a new mask every step).
    window_ids: labels' shape, int64, the unmasked target ids (SFT: the row's shifted tokens, prompt included).
        When given, the hash windows are read from window_ids instead of labels (a position whose window id is
        cfg.ignore_index is never dropped, as in labels); labels still decide which targets count. A response
        token's drop decision then depends only on the token content of its window, not on which earlier
        positions are masked as prompt.
    Returns a bool tensor of labels' shape, on labels' device.
    """
    return _run(ops.goldfish_mask, labels, cfg, step, window_ids)


def apply_goldfish(labels: torch.Tensor, cfg: GoldfishConfig, step: int = 0, *,
                   window_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of `labels` with the dropped positions set to cfg.ignore_index (one pass on the CPU without
    window_ids).

    Use it to feed any loss that honours ignore_index (HF models, torch's cross_entropy);
    goldfish_cross_entropy does the same inside its fused kernel. window_ids: as in goldfish_mask.
    """
    return _run(ops.apply_goldfish, labels, cfg, step, window_ids)
