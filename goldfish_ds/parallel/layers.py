"""Tensor-parallel layers: each rank holds a slice of the weight and the collectives of mappings.py.

Without an initialised tensor-parallel group (a single process) they are plain layers holding the whole
weight. Weights are initialised from the full weight drawn in float32 on the CPU with a seeded generator and
then sliced, so a model has the same parameters at every tensor-parallel size; the slice is copied into a
parameter allocated wherever the caller's context puts new tensors (the accelerator under
`deepspeed.zero.Init`, a default device), so no CPU generator touches another device's memory. Sharded
parameters carry `tensor_model_parallel = True` (DeepSpeed then counts them once per TP group when clipping
gradients); replicated ones do not.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.loss import GoldfishStats
from goldfish_ds.parallel.linear_cross_entropy import vocab_parallel_goldfish_linear_cross_entropy
from goldfish_ds.parallel.mappings import (copy_to_tensor_parallel_region, gather_from_tensor_parallel_region,
                                           reduce_from_tensor_parallel_region, scatter_to_tensor_parallel_region)
from goldfish_ds.parallel.state import default_tensor_parallel_group, group_rank_and_size


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor-parallel size ({parts})")
    return total // parts


_DRAW_WEIGHTS = True


@contextmanager
def uninitialised_weights() -> Iterator[None]:
    """Inside, the layers allocate their weights without drawing them (the values, vocabulary padding included,
    are undefined): for a model whose weights are loaded next, which then costs no random draws and no touched
    memory beyond the allocation."""
    global _DRAW_WEIGHTS
    previous, _DRAW_WEIGHTS = _DRAW_WEIGHTS, False
    try:
        yield
    finally:
        _DRAW_WEIGHTS = previous


def _normal_on_cpu(shape: tuple, std: float, seed: int) -> torch.Tensor:
    # torch.normal with an explicit device and dtype: zero.Init redirects torch.empty/zeros (device and dtype), not it.
    return torch.normal(0.0, std, size=shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32,
                        device="cpu")


def _sharded_parameter(full_shape: tuple, dim: int, rank: int, world: int, std: float, seed: int) -> nn.Parameter:
    """This rank's slice along `dim` of a full normal(0, std) weight drawn with `seed` on the CPU."""
    shape = list(full_shape)
    shape[dim] //= world
    param = nn.Parameter(torch.empty(shape))
    if _DRAW_WEIGHTS:
        with torch.no_grad():
            param.copy_(_normal_on_cpu(full_shape, std, seed).chunk(world, dim=dim)[rank])
    param.tensor_model_parallel = True
    return param


def _vocab_parallel_parameter(vocab_size: int, per_rank: int, start: int, dim: int, std: float,
                              seed: int) -> nn.Parameter:
    """Rows [start, start + per_rank) of a [V_padded, dim] table: normal(0, std) rows of the real vocabulary drawn
    with `seed` on the CPU, zero rows past it."""
    param = nn.Parameter(torch.empty(per_rank, dim))
    if _DRAW_WEIGHTS:
        rows = _normal_on_cpu((vocab_size, dim), std, seed)[start:start + per_rank]
        with torch.no_grad():
            param[:len(rows)].copy_(rows)
            param[len(rows):].zero_()
    param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W [out, in] split by output rows: rank r computes outputs [r out/tp, (r+1) out/tp).

    gather_output=False leaves y split over the ranks (the input of a RowParallelLinear, or vocab-parallel
    logits); True all-gathers it. Backward all-reduces the input gradient.
    """

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool = False, std: float = 0.02,
                 seed: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = default_tensor_parallel_group(group)
        rank, world = group_rank_and_size(self.group)
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = _divide(out_features, world, "ColumnParallelLinear out_features")
        self.gather_output = gather_output
        self.weight = _sharded_parameter((out_features, in_features), 0, rank, world, std, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tensor_parallel_region(x, self.group), self.weight)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T with W [out, in] split by input columns: rank r multiplies inputs [r in/tp, (r+1) in/tp),
    and the partial products are all-reduced. input_is_parallel=False first keeps this rank's input slice."""

    def __init__(self, in_features: int, out_features: int, *, input_is_parallel: bool = True, std: float = 0.02,
                 seed: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = default_tensor_parallel_group(group)
        rank, world = group_rank_and_size(self.group)
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = _divide(in_features, world, "RowParallelLinear in_features")
        self.input_is_parallel = input_is_parallel
        self.weight = _sharded_parameter((out_features, in_features), 1, rank, world, std, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)
        return reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose table [V_padded, H] is split by rows: rank r holds ids [r V_padded/tp, (r+1) V_padded/tp).

    The vocabulary is padded to a multiple of tp (padding rows are zero and never looked up); each rank
    embeds the ids it holds, and the results are all-reduced.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, std: float = 0.02, seed: int = 0,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = default_tensor_parallel_group(group)
        rank, world = group_rank_and_size(self.group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num_embeddings = math.ceil(num_embeddings / world) * world
        self.per_rank = self.padded_num_embeddings // world
        self.vocab_start = rank * self.per_rank
        self.weight = _vocab_parallel_parameter(num_embeddings, self.per_rank, self.vocab_start, embedding_dim, std,
                                                seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel():
            low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(f"VocabParallelEmbedding: ids must be in [0, {self.num_embeddings}), got "
                                 f"[{low}, {high}]")
        if self.per_rank == self.padded_num_embeddings:  # one rank holds the whole table
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)


@dataclass(frozen=True)
class LossTargets:
    """What VocabParallelLMHead.forward needs to return the loss instead of the logits: the arguments of
    vocab_parallel_goldfish_linear_cross_entropy besides the hidden states, the weight and the group.

    labels: [B, T] (or [N]) int64, the same on every tensor-parallel rank; cfg: the goldfish config (None: the
    standard loss); reduction "mean", "sum" or "none"; step: the mask's step (random strategy); window_ids: the
    ids the mask hashes (SFT), labels' shape; return_stats: also return GoldfishStats.
    """

    labels: torch.Tensor
    cfg: Optional[GoldfishConfig]
    reduction: str = "mean"
    step: int = 0
    window_ids: Optional[torch.Tensor] = None
    return_stats: bool = False


class VocabParallelLMHead(nn.Module):
    """Hidden states -> this rank's slice of the logits [.., V_padded/tp], for vocab_parallel_goldfish_cross_entropy,
    or, given `loss_targets`, the goldfish loss itself without any logits buffer.

    The weight has the layout of VocabParallelEmbedding's (pass `tied` to share it). Columns past the real
    vocabulary (padding to a multiple of tp) are set to -inf, so they never win the softmax.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, tied: Optional[VocabParallelEmbedding] = None,
                 std: float = 0.02, seed: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = default_tensor_parallel_group(group)
        rank, world = group_rank_and_size(self.group)
        self.vocab_size = vocab_size
        self.per_rank = math.ceil(vocab_size / world)
        self.vocab_start = rank * self.per_rank
        self.tied = tied
        if tied is None:
            self.weight = _vocab_parallel_parameter(vocab_size, self.per_rank, self.vocab_start, hidden_size, std, seed)
        elif tied.per_rank != self.per_rank or tied.embedding_dim != hidden_size:
            raise ValueError("VocabParallelLMHead: the tied embedding must have the same vocabulary and hidden size")

    def forward(self, hidden: torch.Tensor, loss_targets: Optional[LossTargets] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, GoldfishStats]]:
        """hidden [B, T, H] -> this rank's logits [B, T, V_padded/tp]; with loss_targets, the result of
        vocab_parallel_goldfish_linear_cross_entropy instead (the loss, and GoldfishStats when
        loss_targets.return_stats), equal to vocab_parallel_goldfish_cross_entropy of these logits.

        The fused loss runs inside this forward, so under ZeRO-3 DeepSpeed's hooks gather the weight (tied or not)
        for it, and its weight gradient, computed in the forward pass, arrives in backward like any other. Both
        paths pass hidden through copy_to_tensor_parallel_region: its backward all-reduces dL/dhidden over the
        tensor-parallel group.
        """
        weight = self.tied.weight if self.tied is not None else self.weight
        hidden = copy_to_tensor_parallel_region(hidden, self.group)
        if loss_targets is not None:
            if not isinstance(loss_targets, LossTargets):
                raise TypeError(f"VocabParallelLMHead.forward: loss_targets must be a LossTargets or None, got "
                                f"{type(loss_targets).__name__}")
            t = loss_targets
            return vocab_parallel_goldfish_linear_cross_entropy(
                hidden, weight, t.labels, t.cfg, self.group, t.reduction, step=t.step, return_stats=t.return_stats,
                vocab_size=self.vocab_size, window_ids=t.window_ids)
        logits = F.linear(hidden, weight)
        padding = self.vocab_start + self.per_rank - self.vocab_size
        if padding > 0:  # only the last ranks hold padding columns; in place: linear does not save its output
            logits[..., max(self.per_rank - padding, 0):] = float("-inf")
        return logits
