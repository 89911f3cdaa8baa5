"""The LM head and the goldfish loss in one op: no N x V logits, and dropped tokens cost no LM-head work.

The rows the loss keeps (valid targets the goldfish mask does not drop) are found first, and only they enter
the matmuls, in chunks of C rows sized by a memory budget (plan_chunk_rows). Per chunk: the chunk's hidden
rows are gathered (index_select), logits = h_c @ W^T (an ATen GEMM: cuBLAS on CUDA), our compiled kernel
turns them in place into the loss and the gradient (softmax - onehot) x grad_scale, then
dL/dh_c = G @ W lands in the [N, H] hidden gradient at the chunk's rows (dropped and ignored rows stay 0) and
dL/dW += G^T @ h_c. The gradients are accumulated in the inputs' dtype; each GEMM accumulates in float32
internally (bf16/fp16 GEMMs of ATen/cuBLAS), the kernels compute in float32.

Gradients are computed in the forward pass and saved (for reductions "mean" and "sum"); backward only scales
them by the upstream gradient. For reduction "none" the upstream gradient differs per row, so backward
recomputes each chunk's logits and gradient, scales its rows, and does the two gradient GEMMs then.

Under tensor parallelism (goldfish_ds.parallel.vocab_parallel_goldfish_linear_cross_entropy) each rank holds a
vocabulary slice of W: pass 1 computes each row's local log-sum-exp and target logit chunk by chunk (no logits
kept), the 2 all-reduces of vocab_parallel_goldfish_cross_entropy combine them, and pass 2 recomputes the local
logits of each chunk for the gradient GEMMs.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.kernels import check_device_supported, ops
from goldfish_ds.loss import (GoldfishStats, check_loss_inputs, gradient_scale, reduce_loss, scale_saved_gradients,
                              stats_from_row_losses)
from goldfish_ds.mask import goldfish_mask

DEFAULT_LOGITS_FRACTION = 0.05  # default extra peak: this fraction of the N x V logits the unfused path makes
# Bytes per row of the call's O(N) buffers, outside the chunks: float32 row losses, log-sum-exps and target logits,
# int64 row indices and shard-local labels, bool masks (measured: 25-38 bytes a row at N = 4096), with a margin.
ROW_BUFFER_BYTES = 64
# The default chunk never has fewer rows: a GEMM of fewer rows streams the whole weight per chunk for little work
# (measured in the 1B pipeline at 256 tokens: 5% chunks of 12 rows made the step 1.36x slower than the unfused head).
MIN_CHUNK_ROWS = 128


def plan_chunk_rows(n_rows: int, vocab: int, hidden_size: int, element_size: int,
                    chunk_bytes: Optional[int]) -> int:
    """Rows C per chunk: the most whose temporaries (logits [C, vocab], gathered hidden rows [C, hidden_size] and
    their gradient [C, hidden_size], all of element_size bytes) fit in chunk_bytes, and at least 1.

    chunk_bytes None: 5% of the n_rows x vocab logits the unfused LM head would allocate, less the call's O(N) row
    buffers (n_rows x ROW_BUFFER_BYTES), so the op's whole extra peak memory stays within 5%; but at least
    MIN_CHUNK_ROWS rows (or n_rows if fewer), so below about 20 x MIN_CHUNK_ROWS rows the extra peak is that many
    rows' temporaries instead (at V = 128256 in bf16, 34 MB)."""
    row_bytes = (vocab + 2 * hidden_size) * element_size
    if chunk_bytes is not None:
        return max(1, chunk_bytes // row_bytes)
    budget = int(DEFAULT_LOGITS_FRACTION * n_rows * vocab * element_size) - n_rows * ROW_BUFFER_BYTES
    return max(min(MIN_CHUNK_ROWS, n_rows), budget // row_bytes)


def _chunks(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, rows.numel(), size):
        yield rows[start:start + size]


class _ChunkedLMHeadLoss:
    """One call's tensors: hidden [N, H], the weight [V, H] and its rows in use [V', H] (the rest is vocabulary
    padding), labels [N] (local_labels [N]: the id within this shard, or -1, under tensor parallelism)."""

    def __init__(self, hidden, full_weight, vocab_in_use, labels, local_labels, ignore_index, chunk_rows, group):
        self.labels, self.local_labels, self.vocab_in_use = labels, local_labels, vocab_in_use
        self.ignore_index, self.chunk_rows, self.group = ignore_index, chunk_rows, group
        self.bind(hidden, full_weight)

    def bind(self, hidden: Optional[torch.Tensor], full_weight: Optional[torch.Tensor]) -> None:
        """Points the chunks at these inputs; (None, None) between forward and backward, where autograd holds them
        (saved tensors: checked for in-place changes, freed after the last backward)."""
        self.hidden, self.full_weight = hidden, full_weight
        self.weight = full_weight if full_weight is None or self.vocab_in_use == full_weight.shape[0] \
            else full_weight[:self.vocab_in_use]

    def logits(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_c [C, H], logits [C, V']) of the given rows."""
        h_c = self.hidden.index_select(0, rows)
        return h_c, torch.mm(h_c, self.weight.t())

    def write_gradient_(self, logits: torch.Tensor, rows: torch.Tensor, lse: Optional[torch.Tensor],
                        grad_scale: torch.Tensor) -> torch.Tensor:
        """Turns a chunk's logits into (softmax - onehot) x grad_scale in place; returns its row losses when the
        vocabulary is whole (lse None), else None (the loss came from the statistics pass)."""
        if lse is None:
            return ops.cross_entropy_loss_grad_(logits, self.labels.index_select(0, rows), None, self.ignore_index,
                                                False, grad_scale)
        ops.vocab_parallel_grad_(logits, self.local_labels.index_select(0, rows), None, lse.index_select(0, rows),
                                 grad_scale)
        return None

    def row_losses(self, rows: torch.Tensor, row_loss: torch.Tensor) -> None:
        """row_loss[rows] = the loss of those rows, without gradient (whole vocabulary only)."""
        for rows_c in _chunks(rows, self.chunk_rows):
            _, logits = self.logits(rows_c)
            row_loss.index_copy_(0, rows_c, ops.cross_entropy_loss(logits, self.labels.index_select(0, rows_c),
                                                                   None, self.ignore_index, False))
            del logits  # before the next chunk's: one chunk alive at a time

    def global_lse(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 under tensor parallelism: (lse, row loss) [N] of `rows` over the whole vocabulary."""
        from goldfish_ds.parallel.cross_entropy import global_log_sum_exp  # parallel/ imports this module

        n = self.hidden.shape[0]
        lse_local = torch.zeros(n, dtype=torch.float32, device=self.hidden.device)
        target_logit = torch.zeros_like(lse_local)
        for rows_c in _chunks(rows, self.chunk_rows):
            _, logits = self.logits(rows_c)
            lse_c, target_c = ops.vocab_parallel_stats(logits, self.local_labels.index_select(0, rows_c), None)
            lse_local.index_copy_(0, rows_c, lse_c)
            target_logit.index_copy_(0, rows_c, target_c)
            del logits
        return global_log_sum_exp(lse_local, target_logit, self.group)

    def gradients(self, rows: torch.Tensor, lse: Optional[torch.Tensor], grad_scale: torch.Tensor,
                  row_scale: Optional[torch.Tensor], grad_hidden: Optional[torch.Tensor],
                  grad_weight: Optional[torch.Tensor], row_loss: Optional[torch.Tensor]) -> None:
        """The gradient pass over `rows`: dL/dhidden rows written into grad_hidden [N, H], dL/dW accumulated into
        grad_weight [V', H] (either may be None); row_scale [N] float32 multiplies each row's gradient (None: 1);
        with the whole vocabulary (lse None) and row_loss given, the rows' losses are written there too."""
        for rows_c in _chunks(rows, self.chunk_rows):
            h_c, logits = self.logits(rows_c)
            loss_c = self.write_gradient_(logits, rows_c, lse, grad_scale)
            if row_loss is not None and loss_c is not None:
                row_loss.index_copy_(0, rows_c, loss_c)
            if row_scale is not None:
                ops.scale_rows_(logits, row_scale.index_select(0, rows_c).contiguous())
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, rows_c, torch.mm(logits, self.weight))
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), h_c)
            del h_c, logits


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss and, for "mean"/"sum", both gradients (saved); backward scales them, or for "none"
    recomputes them with the per-row upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, head: _ChunkedLMHeadLoss, kept, stats_rows, reduction):
        kept_rows = kept.nonzero().squeeze(1)
        grad_scale = gradient_scale(kept, reduction)
        row_loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = None
        if head.group is not None:
            lse, row_loss = head.global_lse(stats_rows.nonzero().squeeze(1))
            row_loss = torch.where(stats_rows, row_loss, 0.0)
        elif stats_rows is not kept:
            head.row_losses((stats_rows & ~kept).nonzero().squeeze(1), row_loss)

        grads = (None, None)
        if any(ctx.needs_input_grad[:2]) and reduction != "none":
            grads = _zero_gradients(ctx.needs_input_grad, hidden, weight)
            head.gradients(kept_rows, lse, grad_scale, None, grads[0], _rows_in_use(grads[1], head), row_loss)
        elif head.group is None:
            head.row_losses(kept_rows, row_loss)
        if reduction == "none":  # backward recomputes the gradients: keep what it needs
            ctx.head, ctx.lse, ctx.kept_rows, ctx.grad_scale = head, lse, kept_rows, grad_scale
            ctx.save_for_backward(hidden, weight)
            head.bind(None, None)
        else:
            ctx.save_for_backward(*grads)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(row_loss)
        return reduce_loss(row_loss, kept, reduction, grad_scale), row_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_loss):
        if ctx.reduction == "none":  # per-row upstream gradients: recompute the chunks' gradients with them
            head = ctx.head
            head.bind(*ctx.saved_tensors)
            grad_hidden, grad_weight = _zero_gradients(ctx.needs_input_grad, head.hidden, head.full_weight)
            row_scale = grad_loss.detach().to(torch.float32).reshape(-1)
            head.gradients(ctx.kept_rows, ctx.lse, ctx.grad_scale, row_scale, grad_hidden,
                           _rows_in_use(grad_weight, head), None)
            head.bind(None, None)
        else:
            grad_hidden, grad_weight = scale_saved_gradients(ctx, ctx.saved_tensors, grad_loss)
        return grad_hidden, grad_weight, None, None, None, None


def _zero_gradients(needs_input_grad, hidden: torch.Tensor, weight: torch.Tensor
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Contiguous zero buffers for the gradients of hidden [N, H] and weight that autograd asks for (else None)."""
    return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) if needed else None
                 for t, needed in zip((hidden, weight), needs_input_grad[:2]))


def _rows_in_use(grad_weight: Optional[torch.Tensor], head: _ChunkedLMHeadLoss) -> Optional[torch.Tensor]:
    """The rows of the weight gradient that the GEMMs accumulate into (padding rows stay 0)."""
    return None if grad_weight is None else grad_weight[:head.weight.shape[0]]


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str,
                        chunk_bytes: Optional[int], caller: str, weight_name: str = "weight") -> None:
    """The checks of the fused linear losses: those of the losses on hidden [.., H], then weight [V, H] (same
    dtype and device as hidden) and chunk_bytes (a positive int or None)."""
    check_loss_inputs(hidden, labels, reduction, caller, name="hidden", last_dim="H")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{caller}: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] < 1 \
            or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{caller}: {weight_name} must be a [V, H] tensor with V >= 1 and H = {hidden.shape[-1]} "
                         f"(hidden's last dimension), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{caller}: {weight_name} ({weight.dtype}) and hidden ({hidden.dtype}) must have the same "
                        "dtype")
    if weight.device != hidden.device:
        raise ValueError(f"{caller}: {weight_name} ({weight.device}) and hidden ({hidden.device}) must be on the "
                         "same device")
    if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool)
                                    or chunk_bytes < 1):
        raise ValueError(f"{caller}: chunk_bytes must be a positive int (bytes) or None (5% of the N x V logits), "
                         f"got {chunk_bytes!r}")
    check_device_supported(hidden.device)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         cfg: Optional[GoldfishConfig], reduction: str, step: int, return_stats: bool,
                         window_ids: Optional[torch.Tensor], chunk_bytes: Optional[int],
                         vocab_offset: int, vocab_in_use: int, group: Optional[dist.ProcessGroup]
                         ) -> Union[torch.Tensor, Tuple[torch.Tensor, GoldfishStats]]:
    """The shared body of both fused linear losses, after their checks: weight rows [0, vocab_in_use) hold
    vocabulary ids [vocab_offset, vocab_offset + vocab_in_use) (the rest are padding); group None: the weight
    holds the whole vocabulary."""
    ignore_index = cfg.ignore_index if cfg is not None else -100
    flat_labels = labels.reshape(-1).contiguous()
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if not flat_hidden.is_contiguous():
        flat_hidden = flat_hidden.contiguous()
    valid = flat_labels.ne(ignore_index)
    dropped = goldfish_mask(labels, cfg, step, window_ids=window_ids).reshape(-1) if cfg is not None else None
    kept = valid if dropped is None else valid & ~dropped
    in_shard = (flat_labels >= vocab_offset) & (flat_labels < vocab_offset + vocab_in_use)
    local_labels = torch.where(in_shard, flat_labels - vocab_offset, -1) if group is not None else None
    chunk_rows = plan_chunk_rows(flat_hidden.shape[0], weight.shape[0], weight.shape[1], weight.element_size(),
                                 chunk_bytes)
    head = _ChunkedLMHeadLoss(flat_hidden, weight, vocab_in_use, flat_labels, local_labels, ignore_index, chunk_rows,
                              group)
    stats_rows = valid if return_stats and dropped is not None else kept
    loss, row_loss = _LinearCrossEntropy.apply(flat_hidden, weight, head, kept, stats_rows, reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    if not return_stats:
        return loss
    return loss, stats_from_row_losses(row_loss.detach(), kept, dropped)


def goldfish_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cfg: Optional[GoldfishConfig],
    reduction: str = "mean",
    *,
    step: int = 0,
    return_stats: bool = False,
    window_ids: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GoldfishStats]]:
    """goldfish_cross_entropy(hidden @ weight^T, labels, cfg, ...) without the [N, V] logits.

    hidden: [B, T, H] (or [N, H]) float32, bfloat16 or float16, with or without grad; weight: [V, H] (the LM
    head or tied embedding weight), same dtype and device. labels, cfg, reduction, step, return_stats and
    window_ids: as goldfish_cross_entropy (the same kept rule, stats and loss dtype float32); a label outside
    [0, V) is a ValueError.
    Only kept rows enter the matmuls, C rows at a time; the temporaries of a chunk (logits [C, V], hidden rows
    [C, H] and their gradient [C, H]) take at most chunk_bytes, by default 5% of the N x V logits of the unfused
    path less the O(N) row buffers, so the whole extra peak stays within 5%, and at least 128 rows or N (see
    plan_chunk_rows). dL/dhidden is 0 at dropped and ignored rows; both gradients
    are accumulated in the inputs' dtype, each GEMM in float32 internally. return_stats also computes the
    dropped rows' loss, chunk by chunk without gradient.
    """
    caller = "goldfish_linear_cross_entropy"
    check_linear_inputs(hidden, weight, labels, reduction, chunk_bytes, caller)
    from goldfish_ds.parallel.cross_entropy import check_label_range  # parallel/ imports this module

    vocab = weight.shape[0]
    flat_labels = labels.reshape(-1)
    ignore_index = cfg.ignore_index if cfg is not None else -100
    check_label_range(flat_labels, flat_labels.ne(ignore_index), vocab, vocab, 1, ignore_index, caller)
    return linear_cross_entropy(hidden, weight, labels, cfg, reduction, step, return_stats, window_ids,
                                chunk_bytes, 0, vocab, None)
