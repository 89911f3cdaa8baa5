"""The goldfish loss in Megatron-LM's `pretrain_gpt.py` (megatron-core's GPTModel), in two or three lines.

Layouts: `get_batch` gives tokens, labels and loss_mask as [b, s] (batch first). Given labels, GPTModel
transposes them to [s, b] for `tensor_parallel.vocab_parallel_cross_entropy` (logits [s, b, V/tp]) and
returns the per-token losses as [b, s] again, which `loss_func` multiplies by loss_mask. The functions here
take Megatron's [b, s] batch tensors: each row is one sequence, hashed along s. The goldfish mask needs no
tensor-parallel awareness: it depends on the labels alone, which `get_batch_on_this_tp_rank` gives every
TP rank identically, so it is multiplied into loss_mask and the vocab-parallel loss stays Megatron's.

In `forward_step`, either keep Megatron's own `loss_func` and change the mask:
    loss_mask = goldfish_loss_mask(labels, loss_mask, GOLDFISH)
or use the drop-in `loss_func`, which also reports the drop rate and the loss on all tokens:
    return output_tensor, partial(goldfish_loss_func, GOLDFISH, labels, loss_mask)
With context parallelism (--context-parallel-size > 1) the mask must see whole sequences: apply
goldfish_loss_mask in `get_batch`, before `get_batch_on_this_cp_rank` splits them.
This module does not import megatron.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.mask import goldfish_mask


def _check_batch(labels: torch.Tensor, loss_mask: torch.Tensor, cfg: GoldfishConfig, caller: str) -> None:
    if not isinstance(cfg, GoldfishConfig):
        raise TypeError(f"{caller}: cfg must be a goldfish_ds.GoldfishConfig, got {type(cfg).__name__}")
    for name, value in (("labels", labels), ("loss_mask", loss_mask)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(f"{caller}: {name} must be Megatron's [b, s] batch tensor, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if labels.shape != loss_mask.shape:
        raise ValueError(f"{caller}: labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must have "
                         "the same [b, s] shape")
    if labels.device != loss_mask.device:
        raise ValueError(f"{caller}: labels ({labels.device}) and loss_mask ({loss_mask.device}) must be on the same "
                         "device")
    if not loss_mask.is_floating_point():
        raise TypeError(f"{caller}: loss_mask must be a floating-point tensor (Megatron's is float), got "
                        f"{loss_mask.dtype}")


def goldfish_loss_mask(labels: Optional[torch.Tensor], loss_mask: Optional[torch.Tensor], cfg: GoldfishConfig, *,
                       step: int = 0) -> Optional[torch.Tensor]:
    """Megatron's loss_mask with the targets the goldfish mask drops set to 0.

    labels: [b, s] int64, Megatron's batch layout (labels[:, t] = tokens[:, t + 1]); not the [s, b] layout
    of the vocab-parallel loss. loss_mask: [b, s] float, on labels' device. The mask is computed on that
    device by the compiled kernels (CUDA on a GPU) and is goldfish_ds.goldfish_mask(labels, cfg, step).
    step: only the "random" strategy uses it (pass the iteration).
    Returns a new tensor (loss_mask's dtype); loss_mask itself is not modified. On pipeline stages that
    have no labels (both None) it returns None.
    """
    if labels is None and loss_mask is None:
        return None  # a pipeline stage without the loss
    _check_batch(labels, loss_mask, cfg, "goldfish_loss_mask")
    return loss_mask.masked_fill(goldfish_mask(labels, cfg, step), 0)


def goldfish_loss_func(cfg: GoldfishConfig, labels: torch.Tensor, loss_mask: torch.Tensor,
                       output_tensor: torch.Tensor, *, step: int = 0
                       ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Drop-in for `pretrain_gpt.py`'s loss_func: `partial(goldfish_loss_func, cfg, labels, loss_mask)`.

    output_tensor: [b, s] per-token losses, what GPTModel(..., labels=labels) returns.
    labels, loss_mask: the micro-batch's [b, s] tensors from get_batch (loss_mask without goldfish).
    Returns Megatron's three-tuple: the sum of the kept targets' losses, their number (int tensor), which
    megatron.core's schedules divide the sum by (unless calculate_per_token_loss), and the reporting dict,
    each value a [2] tensor (numerator, denominator) that Megatron's training loop sums over micro-batches
    and data-parallel ranks and divides: "lm loss" (the goldfish loss, over kept targets), "lm loss all
    tokens" (over every target loss_mask counts, what the standard loss would be) and "goldfish drop rate"
    (dropped / counted targets). Megatron's own loss_func checks for NaN and spiky losses; this one does not.
    """
    kept_mask = goldfish_loss_mask(labels, loss_mask, cfg, step=step)
    if not isinstance(output_tensor, torch.Tensor) or output_tensor.shape != labels.shape:
        raise ValueError(f"goldfish_loss_func: output_tensor must be the [b, s] per-token losses, shape "
                         f"{tuple(labels.shape)}, got "
                         f"{tuple(output_tensor.shape) if isinstance(output_tensor, torch.Tensor) else output_tensor}")
    losses = output_tensor.float()
    counted = loss_mask.float()
    kept = kept_mask.float()
    loss = torch.sum(losses * kept)
    num_kept, num_counted = kept.sum(), counted.sum()
    report = {
        "lm loss": torch.stack([loss.detach(), num_kept]),
        "lm loss all tokens": torch.stack([torch.sum(losses.detach() * counted), num_counted]),
        "goldfish drop rate": torch.stack([num_counted - num_kept, num_counted]),
    }
    return loss, num_kept.to(torch.int), report
