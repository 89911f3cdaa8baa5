"""Vocab-parallel LM head + goldfish loss in one op: each tensor-parallel rank holds a vocabulary slice of the
LM-head weight, no rank holds logits beyond one chunk, and only O(N) floats cross the wire.

Communication per call (on `group`): the 2 all-reduces of vocab_parallel_goldfish_cross_entropy (MAX of [N]
floats, SUM of [2, N] floats), between the statistics pass and the gradient pass. The all-reduce of dL/dhidden
is the caller's: pass hidden through copy_to_tensor_parallel_region (its backward all-reduces), as
VocabParallelLMHead does.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.linear_cross_entropy import check_linear_inputs, linear_cross_entropy
from goldfish_ds.loss import GoldfishStats
from goldfish_ds.parallel.cross_entropy import check_label_range, checked_group, checked_vocab_size


def vocab_parallel_goldfish_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    labels: torch.Tensor,
    cfg: Optional[GoldfishConfig],
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    *,
    step: int = 0,
    return_stats: bool = False,
    vocab_size: Optional[int] = None,
    window_ids: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GoldfishStats]]:
    """vocab_parallel_goldfish_cross_entropy(F.linear(hidden, local_weight), labels, cfg, group, ...) without the
    [N, V/tp] logits.

    hidden: [B, T, H] (or [N, H]), the same on every rank (pass copy_to_tensor_parallel_region(hidden, group) so
    that backward all-reduces dL/dhidden); local_weight: [ceil(V/tp), H], rank r's vocabulary rows
    [r ceil(V/tp), (r+1) ceil(V/tp)) as in VocabParallelLMHead, same dtype and device as hidden. Rows at ids
    >= vocab_size (default: ceil(V/tp) x tp) are padding: they never enter the softmax and get a zero gradient.
    group: the tensor-parallel group (default: the one from initialize_model_parallel; without one, a single
    shard). chunk_bytes and the rest: as goldfish_linear_cross_entropy and vocab_parallel_goldfish_cross_entropy;
    the loss and stats are identical on every rank, and each rank's weight gradient is its own slice.
    """
    caller = "vocab_parallel_goldfish_linear_cross_entropy"
    check_linear_inputs(hidden, local_weight, labels, reduction, chunk_bytes, caller, weight_name="local_weight")
    group, rank, world = checked_group(group, caller, "6th")
    shard = local_weight.shape[0]
    vocab = checked_vocab_size(vocab_size, shard, world, caller)
    ignore_index = cfg.ignore_index if cfg is not None else -100
    flat_labels = labels.reshape(-1)
    check_label_range(flat_labels, flat_labels.ne(ignore_index), vocab, shard, world, ignore_index, caller)
    start = rank * shard
    return linear_cross_entropy(hidden, local_weight, labels, cfg, reduction, step, return_stats, window_ids,
                                chunk_bytes, start, min(shard, vocab - start), group)
