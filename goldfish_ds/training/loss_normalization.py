"""How a training step's loss is normalised: per micro-batch, or by the kept targets of the whole global batch.

`micro_batch` (the official definition): each micro-batch's loss is the mean over its own kept targets, so a
kept target weighs 1 / (its micro-batch's kept count); with SFT masks and goldfish the kept counts vary between
micro-batches and a target in a sparse micro-batch weighs more. `global_tokens`: every kept target of the global
batch (all accumulation micro-batches of every data-parallel rank) weighs the same, 1 / G, G the global kept count,
as transformers' Trainer normalises since its gradient-accumulation fix (`num_items_in_batch`).
"""
from __future__ import annotations

from typing import Optional

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.mask import goldfish_mask

LOSS_NORMALIZATIONS = ("micro_batch", "global_tokens")


def kept_targets(labels: torch.Tensor, cfg: Optional[GoldfishConfig], ignore_index: int, step: int,
                 window_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many targets of labels [B, T] the loss keeps (not ignore_index, not dropped by the goldfish mask of
    `step`, hashed over window_ids when given; cfg=None: no drops), as the goldfish losses decide: an int64 0-dim
    tensor on labels' device."""
    kept = labels.ne(ignore_index)
    if cfg is not None:
        kept &= ~goldfish_mask(labels, cfg, step, window_ids=window_ids)
    return kept.sum()


def global_tokens_loss_scale(global_kept: torch.Tensor, accumulation_steps: int, averaged_over: int) -> torch.Tensor:
    """The factor c (float32 0-dim, on global_kept's device) by which `global_tokens` multiplies each micro-batch's
    SUM of kept-target losses. global_kept: G, the kept targets of the whole global batch (kept_targets summed over
    this rank's micro-batches of the step, then all-reduced over the data-parallel group; the ranks of a
    tensor-parallel group hold the same rows, and each is in another data-parallel group).

    Derivation. DeepSpeed's engine.backward divides each of the A = accumulation_steps micro-batch losses by A,
    and the gradient reduction averages over the W = averaged_over data-parallel ranks (ZeRO-3's reduce-scatter
    always; ZeRO 0-2 unless the DeepSpeed config sets gradient_allreduce_op "sum": then W = 1). With S_{r,m} the
    sum of kept-target losses of micro-batch m on rank r, the accumulated gradient is
        (1 / W) sum_r (1 / A) sum_m d(c S_{r,m}) = (c / (A W)) d(sum_{r,m} S_{r,m}),
    so c = A W / G makes it d(sum of the global batch's kept-target losses / G). When G = 0 every S is 0: c is
    computed with G = 1, and the gradient is 0 (not NaN), as the per-micro-batch mean gives.
    """
    return (accumulation_steps * averaged_over / global_kept.clamp(min=1).double()).float()
