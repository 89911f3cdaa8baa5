"""Vocab-parallel goldfish cross-entropy: each tensor-parallel rank holds a contiguous slice of the
vocabulary's logits, and only O(N) floats cross the wire.

Communication per call (on `group`): 2 all-reduces, the MAX of the local log-sum-exp [N] floats, then
the SUM of [2, N] floats (the rescaled local sums of exponentials and the target logit, which one rank
holds). A gather of the logits would move N x V values. The goldfish mask is computed from the full
label tensor, identical on every rank, and applied inside the loss like ignore_index.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.kernels import check_device_supported, ops
from goldfish_ds.loss import (GoldfishStats, check_loss_inputs, gradient_scale, reduce_loss, scale_saved_gradients,
                              stats_from_row_losses)
from goldfish_ds.mask import goldfish_mask
from goldfish_ds.parallel.state import default_tensor_parallel_group, group_rank_and_size


def global_log_sum_exp(lse_local: torch.Tensor, target_logit: torch.Tensor,
                       group: Optional[dist.ProcessGroup]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse, row loss) [N] over the whole vocabulary from each shard's local log-sum-exp and target logit [N]
    (0 where the target is another shard's): 2 all-reduces on `group` (None: one shard, no communication),
    the MAX of [N] floats, then the SUM of [2, N] floats."""
    global_max = lse_local.clone()
    if group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(lse_local - global_max), target_logit])
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    lse = global_max + torch.log(sums[0])
    return lse, lse - sums[1]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Statistics pass, two all-reduces, then the gradient pass (in place by default); backward rescales."""

    @staticmethod
    def forward(ctx, logits, local_labels, kept, stats_rows, reduction, in_place, group):
        # Local statistics of the rows whose loss is wanted (kept, plus dropped ones for diagnostics).
        lse_local, target_logit = ops.vocab_parallel_stats(logits, local_labels, ~stats_rows)
        lse, row_loss = global_log_sum_exp(lse_local, target_logit, group)

        grad_scale = gradient_scale(kept, reduction)
        if ctx.needs_input_grad[0]:
            if in_place:
                ops.vocab_parallel_grad_(logits, local_labels, ~kept, lse, grad_scale)
                torch.autograd.graph.increment_version(logits)  # autograd must see that the logits changed
                grad = logits
            else:
                grad = ops.vocab_parallel_grad(logits, local_labels, ~kept, lse, grad_scale)
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(row_loss)
        return reduce_loss(row_loss, kept, reduction, grad_scale), row_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_loss):
        return (*scale_saved_gradients(ctx, ctx.saved_tensors, grad_loss), None, None, None, None, None, None)


def _check_labels_match(labels: torch.Tensor, group: dist.ProcessGroup) -> None:
    weights = torch.arange(1, labels.numel() + 1, dtype=torch.int64, device=labels.device)
    checksum = (labels * weights).sum()  # position-weighted, wrapping: differs for reordered labels too
    both = torch.stack([checksum, -checksum])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if both[0] != -both[1]:
        raise ValueError("vocab_parallel_goldfish_cross_entropy: labels differ between the tensor-parallel ranks "
                         "(every rank of a TP group must see the same batch)")


def checked_group(group, caller: str, reduction_position: str) -> Tuple[Optional[dist.ProcessGroup], int, int]:
    """(group, rank, world) of a loss's `group` argument: a ProcessGroup, or None for the default tensor-parallel
    group (initialize_model_parallel's; without one, a single shard); group None when world is 1 (nothing to
    communicate). Anything else is a TypeError naming where reduction goes (a common positional slip)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{caller}: group must be a torch.distributed ProcessGroup or None, got {group!r} "
                        f"(reduction is its {reduction_position} argument: pass it as reduction=...)")
    group = default_tensor_parallel_group(group)
    rank, world = group_rank_and_size(group)
    return (group if world > 1 else None), rank, world


def checked_vocab_size(vocab_size: Optional[int], shard: int, world: int, caller: str) -> int:
    """The real vocabulary V for `world` shards of `shard` ids (default shard x world): refused unless an int in
    (shard x (world - 1), shard x world], so that every shard holds at least one real id."""
    padded = shard * world
    vocab = padded if vocab_size is None else vocab_size
    if not (isinstance(vocab, int) and not isinstance(vocab, bool) and padded - shard < vocab <= padded):
        raise ValueError(f"{caller}: vocab_size must be an int in ({padded - shard}, {padded}] ({world} shards of "
                         f"{shard} logits), got {vocab_size!r}")
    return vocab


def check_label_range(flat_labels: torch.Tensor, valid: torch.Tensor, vocab: int, shard: int, world: int,
                      ignore_index: int, caller: str) -> None:
    """ValueError unless every valid label [N] is in [0, vocab) (one host sync)."""
    bad = valid & ((flat_labels < 0) | (flat_labels >= vocab))
    if bad.any():
        padded = shard * world
        padding = f", padded to {padded} for {world} shards of {shard}" if vocab < padded else ""
        raise ValueError(f"{caller}: labels must be in [0, {vocab}) (vocab_size {vocab}{padding}) or "
                         f"ignore_index={ignore_index}; found {flat_labels[bad][0].item()}")


def vocab_parallel_goldfish_cross_entropy(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: Optional[GoldfishConfig],
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    *,
    step: int = 0,
    in_place: bool = True,
    return_stats: bool = False,
    check_labels_match: bool = False,
    vocab_size: Optional[int] = None,
    window_ids: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GoldfishStats]]:
    """goldfish_cross_entropy for logits split over the vocabulary across the ranks of `group`.

    local_logits: [B, T, V/tp] (or [N, V/tp]): rank r holds vocabulary columns [r V/tp, (r+1) V/tp).
    Columns that pad the vocabulary to a multiple of tp must hold -inf (they then never win the softmax).
    labels: [B, T] (or [N]) int64, the same on every rank, in [0, V) or cfg.ignore_index.
    vocab_size: the real vocabulary V (default: V/tp x tp, no padding); a label in [V, V/tp x tp), a
    padding column, is refused like any other label outside the vocabulary (it would meet a -inf logit).
    group: the tensor-parallel group (default: the one from initialize_model_parallel; without one, a
    single shard holding the whole vocabulary, with no communication).
    check_labels_match: debug mode: one more all-reduce (of 2 integers) verifies that every rank holds the
    same labels, and raises ValueError if not (different labels would silently mix unrelated rows).
    window_ids: the ids the mask's hash windows are read from (SFT), the same on every rank; see goldfish_mask.
    The other arguments and the result are those of goldfish_ds.goldfish_cross_entropy; the loss and its
    statistics are identical on every rank, and each rank's gradient is its own slice.
    """
    check_loss_inputs(local_logits, labels, reduction, "vocab_parallel_goldfish_cross_entropy")
    check_device_supported(local_logits.device)
    group, rank, world = checked_group(group, "vocab_parallel_goldfish_cross_entropy", "5th")
    shard = local_logits.shape[-1]
    ignore_index = cfg.ignore_index if cfg is not None else -100

    flat_labels = labels.reshape(-1).contiguous()
    if check_labels_match and group is not None:
        _check_labels_match(flat_labels, group)
    vocab = checked_vocab_size(vocab_size, shard, world, "vocab_parallel_goldfish_cross_entropy")
    valid = flat_labels.ne(ignore_index)
    check_label_range(flat_labels, valid, vocab, shard, world, ignore_index, "vocab_parallel_goldfish_cross_entropy")
    if cfg is None:
        dropped = torch.zeros_like(valid)
    else:
        dropped = goldfish_mask(labels, cfg, step, window_ids=window_ids).reshape(-1)
    kept = valid & ~dropped
    start = rank * shard
    local_labels = torch.where((flat_labels >= start) & (flat_labels < start + shard), flat_labels - start, -1)
    flat_logits = local_logits.reshape(-1, shard)
    if not flat_logits.is_contiguous():
        flat_logits = flat_logits.contiguous()
    stats_rows = valid if return_stats else kept
    loss, row_loss = _VocabParallelCrossEntropy.apply(flat_logits, local_labels, kept, stats_rows, reduction,
                                                      in_place, group)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    if not return_stats:
        return loss
    return loss, stats_from_row_losses(row_loss.detach(), kept, dropped if cfg is not None else None)
