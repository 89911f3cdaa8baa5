"""Goldfish cross-entropy: the mean next-token loss over the kept targets, fused in one kernel.

The kernel reads each kept logits row once and writes its gradient during the forward pass, by default
into the logits buffer itself (the logits come fresh from the LM head and are not needed again), so no
N x V buffer is allocated. Dropped and ignored rows cost only a zero gradient row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.kernels import check_device_supported, ops
from goldfish_ds.mask import goldfish_mask

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class GoldfishStats:
    """Per-call diagnostics (0-dim tensors, detached; the official run logged the same quantities).

    kept_tokens: targets in the loss. dropped_tokens: targets the goldfish mask removed.
    drop_rate: dropped / (kept + dropped), the realised fraction of supervised targets dropped.
    loss_kept: mean loss over kept targets (the training loss). loss_all_tokens: mean over kept and
    dropped targets (what the standard loss would be). loss_dropped_tokens: mean over dropped targets.
    Means over zero tokens are 0.
    """

    kept_tokens: torch.Tensor
    dropped_tokens: torch.Tensor
    drop_rate: torch.Tensor
    loss_kept: torch.Tensor
    loss_all_tokens: torch.Tensor
    loss_dropped_tokens: torch.Tensor


def _safe_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1).to(total.dtype)


def gradient_scale(kept: torch.Tensor, reduction: str) -> torch.Tensor:
    """The factor [1] (float32, on kept's device) the kernels apply to the gradient: 1 / kept count for "mean"."""
    if reduction == "mean":
        return (1.0 / kept.sum().clamp(min=1).to(torch.float32)).reshape(1)
    return torch.ones(1, dtype=torch.float32, device=kept.device)


def reduce_loss(row_loss: torch.Tensor, kept: torch.Tensor, reduction: str, grad_scale: torch.Tensor) -> torch.Tensor:
    """The loss over kept rows: per row ("none"), summed, or summed times grad_scale (the mean)."""
    kept_loss = torch.where(kept, row_loss, 0.0)
    if reduction == "none":
        return kept_loss
    return kept_loss.sum() * grad_scale[0] if reduction == "mean" else kept_loss.sum()


def scale_saved_gradients(ctx, grads: tuple, grad_loss: torch.Tensor) -> tuple:
    """Backward of the fused losses: the gradients the forward pass stored (None entries stay None), times the
    upstream gradient (one value, or one per row). The first backward scales them in place (no second buffer);
    a later one through a retained graph returns copies rescaled by the ratio of the two upstream gradients, and
    raises where the first was 0 (that stored gradient is then 0)."""
    scale = grad_loss.detach().to(torch.float32).reshape(-1).contiguous()
    first = getattr(ctx, "first_upstream", None)
    if first is None:
        ctx.first_upstream = scale.clone()
        for grad in grads:
            if grad is not None:
                ops.scale_rows_(grad, scale)
        return grads
    if bool(first.eq(0).any()):
        raise RuntimeError("a second backward (retain_graph=True) through a fused goldfish loss whose first "
                           "upstream gradient had a 0: the stored gradient was scaled in place to 0 there; run "
                           "the forward again")
    ratio = scale / first
    rescaled = tuple(None if grad is None else grad.clone() for grad in grads)
    for grad in rescaled:
        if grad is not None:
            ops.scale_rows_(grad, ratio)
    return rescaled


class _FusedCrossEntropy(torch.autograd.Function):
    """Loss and gradient in one kernel call; backward only rescales the stored gradient."""

    @staticmethod
    def forward(ctx, logits, labels, dropped, kept, ignore_index, reduction, in_place, dropped_loss):
        grad_scale = gradient_scale(kept, reduction)
        if ctx.needs_input_grad[0]:
            if in_place:
                row_loss = ops.cross_entropy_loss_grad_(logits, labels, dropped, ignore_index, dropped_loss, grad_scale)
                torch.autograd.graph.increment_version(logits)  # autograd must see that the logits changed
                grad = logits
            else:
                row_loss, grad = ops.cross_entropy_loss_grad(logits, labels, dropped, ignore_index, dropped_loss,
                                                             grad_scale)
            ctx.save_for_backward(grad)
        else:
            row_loss = ops.cross_entropy_loss(logits, labels, dropped, ignore_index, dropped_loss)
        ctx.mark_non_differentiable(row_loss)
        return reduce_loss(row_loss, kept, reduction, grad_scale), row_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_loss):
        return (*scale_saved_gradients(ctx, ctx.saved_tensors, grad_loss), None, None, None, None, None, None, None)


def check_loss_inputs(logits: torch.Tensor, labels: torch.Tensor, reduction: str, caller: str,
                      name: str = "logits", last_dim: str = "V") -> None:
    """Python-side checks shared by the losses: shapes, dtypes, devices and the reduction name.

    name / last_dim: what the input is called in the messages (the fused linear loss checks its
    hidden states [.., H] here).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"{caller}: reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"{caller}: {name} must be a [B, T, {last_dim}] or [N, {last_dim}] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{caller}: {name} need a last dimension {last_dim} >= 1, got shape {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{caller}: labels must have shape {tuple(logits.shape[:-1])} ({name}' shape without "
                         f"{last_dim}), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{caller}: labels must be int64 (torch.long), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{caller}: labels ({labels.device}) and {name} ({logits.device}) must be on the same "
                         "device")


def goldfish_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: Optional[GoldfishConfig],
    reduction: str = "mean",
    *,
    step: int = 0,
    in_place: bool = True,
    return_stats: bool = False,
    window_ids: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GoldfishStats]]:
    """Cross-entropy over the targets the goldfish mask keeps.

    logits: [B, T, V] (or [N, V]) float32, bfloat16 or float16; labels: [B, T] (or [N]) int64, the
    shifted targets, each in [0, V) or cfg.ignore_index. The mask is computed per row of labels
    (an [N] label vector is one row). cfg=None gives the standard loss (no tokens dropped, ignore_index
    -100), through the same kernel.
    reduction: "mean" (over kept targets; 0 when none is kept), "sum", or "none" ([B, T] float32, zero
    at dropped and ignored positions). The loss is float32 whatever the logits' dtype.
    in_place: when the logits need a gradient, write it into the logits buffer (their values are gone
    after this call). Pass False to keep the logits; the gradient then takes a new buffer.
    return_stats: also return GoldfishStats (computing the loss of dropped rows too: they are then read).
    window_ids: labels' shape, int64: hash the mask's windows over these ids instead of labels (SFT: the
    unmasked targets, so -100 prompt labels do not change a response's mask); see goldfish_mask. Unused
    when cfg is None.
    """
    check_loss_inputs(logits, labels, reduction, "goldfish_cross_entropy")
    check_device_supported(logits.device)

    ignore_index = cfg.ignore_index if cfg is not None else -100
    flat_labels = labels.reshape(-1).contiguous()
    dropped = goldfish_mask(labels, cfg, step, window_ids=window_ids).reshape(-1) if cfg is not None else None
    valid = flat_labels.ne(ignore_index)
    kept = valid if dropped is None else valid & ~dropped
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if not flat_logits.is_contiguous():
        flat_logits = flat_logits.contiguous()  # a copy: the in-place gradient then lands in it, not in logits
    loss, row_loss = _FusedCrossEntropy.apply(flat_logits, flat_labels, dropped, kept, ignore_index, reduction,
                                              in_place, return_stats and dropped is not None)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    if not return_stats:
        return loss
    return loss, stats_from_row_losses(row_loss.detach(), kept, dropped)


def stats_from_row_losses(row_loss: torch.Tensor, kept: torch.Tensor, dropped: Optional[torch.Tensor]) -> GoldfishStats:
    """GoldfishStats from per-row losses [N] (valid at kept and dropped rows) and the row masks [N]."""
    if dropped is None:
        dropped = torch.zeros_like(kept)
    n_kept, n_dropped = kept.sum(), dropped.sum()
    loss_kept_sum = torch.where(kept, row_loss, 0.0).sum()
    loss_dropped_sum = torch.where(dropped, row_loss, 0.0).sum()
    return GoldfishStats(
        kept_tokens=n_kept,
        dropped_tokens=n_dropped,
        drop_rate=_safe_mean(n_dropped.to(torch.float32), n_kept + n_dropped),
        loss_kept=_safe_mean(loss_kept_sum, n_kept),
        loss_all_tokens=_safe_mean(loss_kept_sum + loss_dropped_sum, n_kept + n_dropped),
        loss_dropped_tokens=_safe_mean(loss_dropped_sum, n_dropped),
    )
