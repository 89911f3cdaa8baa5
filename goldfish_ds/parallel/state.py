"""Process groups of tensor parallelism (TP) and data parallelism (DP), built once per job.

The world of `torch.distributed` is split into TP groups of consecutive ranks ([0, tp), [tp, 2 tp), ...)
and DP groups of the ranks that hold the same TP shard (r, r + tp, r + 2 tp, ...). Every rank must call
initialize_model_parallel with the same size, after torch.distributed is initialised (gloo on CPU, NCCL
on GPU), however the ranks were launched.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist

_TP_GROUP: Optional[dist.ProcessGroup] = None
_DP_GROUP: Optional[dist.ProcessGroup] = None


def initialize_model_parallel(tensor_parallel_size: int, timeout_s: Optional[float] = None) -> None:
    """Create this rank's TP and DP groups. `tensor_parallel_size` must divide the world size.

    timeout_s bounds the groups' collectives (torch gives new groups 30 minutes, not the default group's
    timeout); None keeps torch's default.
    """
    global _TP_GROUP, _DP_GROUP
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if _TP_GROUP is not None:
        raise RuntimeError("initialize_model_parallel: already initialised (call destroy_model_parallel first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(f"initialize_model_parallel: tensor_parallel_size must be a positive divisor of the world "
                         f"size {world}, got {tensor_parallel_size!r}")
    tp = tensor_parallel_size
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    # Every rank creates every group, in the same order, as torch.distributed.new_group requires.
    for start in range(0, world, tp):
        group = dist.new_group(list(range(start, start + tp)), timeout=timeout)
        if start <= rank < start + tp:
            _TP_GROUP = group
    for first in range(tp):
        group = dist.new_group(list(range(first, world, tp)), timeout=timeout)
        if rank % tp == first:
            _DP_GROUP = group


def model_parallel_is_initialized() -> bool:
    return _TP_GROUP is not None


def destroy_model_parallel() -> None:
    """Forget the groups (they are destroyed with the default group by destroy_process_group)."""
    global _TP_GROUP, _DP_GROUP
    _TP_GROUP = _DP_GROUP = None


def _require(group: Optional[dist.ProcessGroup], name: str) -> dist.ProcessGroup:
    if group is None:
        raise RuntimeError(f"goldfish_ds.parallel: the {name} group is not initialised "
                           "(call initialize_model_parallel)")
    return group


def tensor_parallel_group() -> dist.ProcessGroup:
    return _require(_TP_GROUP, "tensor-parallel")


def default_tensor_parallel_group(group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """`group` if given, else the TP group if initialised, else None: a single process without TP."""
    if group is not None:
        return group
    return _TP_GROUP


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple:
    """(rank, size) of this process in `group`; (0, 1) for None (no tensor parallelism)."""
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def data_parallel_group() -> dist.ProcessGroup:
    return _require(_DP_GROUP, "data-parallel")


def tensor_parallel_rank() -> int:
    return dist.get_rank(tensor_parallel_group())


def tensor_parallel_world_size() -> int:
    return dist.get_world_size(tensor_parallel_group())


def data_parallel_rank() -> int:
    return dist.get_rank(data_parallel_group())


def data_parallel_world_size() -> int:
    return dist.get_world_size(data_parallel_group())


class _DeepSpeedMPU:
    """The model-parallel unit DeepSpeed takes as `deepspeed.initialize(..., mpu=mpu)`: ZeRO then shards
    over the data-parallel group and clips gradients across tensor-parallel shards. (It must not have an
    `initialize_sequence_parallel` attribute, which would make DeepSpeed treat it as sequence-parallel.)"""

    get_model_parallel_group = staticmethod(tensor_parallel_group)
    get_model_parallel_rank = staticmethod(tensor_parallel_rank)
    get_model_parallel_world_size = staticmethod(tensor_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(tensor_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(tensor_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(tensor_parallel_world_size)
    get_data_parallel_group = staticmethod(data_parallel_group)
    get_data_parallel_rank = staticmethod(data_parallel_rank)
    get_data_parallel_world_size = staticmethod(data_parallel_world_size)


mpu = _DeepSpeedMPU()
