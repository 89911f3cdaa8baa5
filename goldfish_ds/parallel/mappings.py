"""The four autograd collectives of tensor parallelism, on the last dimension of activations.

Each states what crosses the wire for an activation x of E elements on a group of tp ranks. The group
defaults to the one from initialize_model_parallel; without one (a single process) they are identities.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from goldfish_ds.parallel.state import default_tensor_parallel_group, group_rank_and_size


def _all_reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group_rank_and_size(group)[1] == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    rank, world = group_rank_and_size(group)
    if world == 1:
        return x
    if x.shape[-1] % world:
        raise ValueError(f"the last dimension ({x.shape[-1]}) must be divisible by the tensor-parallel size {world}")
    return x.chunk(world, dim=-1)[rank].contiguous()


def _gather_last(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    world = group_rank_and_size(group)[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Forward: identity (nothing sent). Backward: all-reduce (sum) of the gradient, E elements."""
    return _CopyToRegion.apply(x, default_tensor_parallel_group(group))


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Forward: all-reduce (sum), E elements. Backward: identity (nothing sent)."""
    return _ReduceFromRegion.apply(x, default_tensor_parallel_group(group))


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Forward: keep this rank's slice of the last dimension (nothing sent). Backward: all-gather, E elements."""
    return _ScatterToRegion.apply(x, default_tensor_parallel_group(group))


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Forward: all-gather along the last dimension, tp x E elements. Backward: keep this rank's slice."""
    return _GatherFromRegion.apply(x, default_tensor_parallel_group(group))
