"""ZeRO-3 parameter partitions read and written directly, never the whole model on one rank.

Under `deepspeed.zero.Init` a parameter of ds_numel elements (its tensor-parallel slice, of shape ds_shape)
is split over its data-parallel group `ds_process_group` into dp partitions of p = ceil(ds_numel / dp)
elements: DP rank i holds elements [i p, (i + 1) p) of the flattened tensor in `param.ds_tensor`, the last
partition padded past ds_numel. Import fills each rank's own partition from the checkpoint (no
communication; a rank reads about 1/dp of each tensor); export gathers one parameter at a time onto DP
rank 0 (the others' partitions stay put).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from goldfish_ds.models import HFCheckpoint, Llama
from goldfish_ds.models.hf import hf_parameters, read_tensor_parallel_rows, tensor_parallel_shape


def is_partitioned(model: nn.Module) -> bool:
    """Whether the model's parameters are ZeRO-3 partitions (built under deepspeed.zero.Init)."""
    return all(hasattr(p, "ds_tensor") for p in model.parameters())


def partition_range(param: nn.Parameter) -> Tuple[int, int]:
    """[start, stop) of the flattened parameter held by this rank's partition (stop <= ds_numel; it may be empty)."""
    group = param.ds_process_group
    size = math.ceil(param.ds_numel / dist.get_world_size(group))
    if param.ds_tensor.numel() != size:
        raise RuntimeError(f"ZeRO-3 partition of {tuple(param.ds_shape)} holds {param.ds_tensor.numel()} elements, "
                           f"not ceil(ds_numel / dp) = {size}: this DeepSpeed partitions differently")
    start = dist.get_rank(group) * size
    return min(start, param.ds_numel), min(start + size, param.ds_numel)


def load_hf_into_partitions(model: Llama, directory: str) -> None:
    """Fill this rank's ZeRO-3 partition of every parameter from an HF checkpoint: the rows of this rank's
    tensor-parallel slice that cover its flat range are read, flattened, cut and copied into param.ds_tensor
    (the padding past the tensor's end is zeroed). Call it before deepspeed.initialize."""
    checkpoint = HFCheckpoint(directory)
    for entry in hf_parameters(model):
        param = entry.param
        if getattr(param, "ds_secondary_tensor", None) is not None:
            raise ValueError("loading an HF checkpoint into ZeRO-3 partitions: zero_hpz_partition_size > 1 "
                             "(secondary partitions) is not supported; set it to 1")
        if getattr(param.ds_tensor, "final_location", None) is not None:
            raise ValueError("loading an HF checkpoint into ZeRO-3 partitions: offload_param to nvme is not "
                             "supported; offload to cpu or none")
        shape = tuple(param.ds_shape)
        if shape != tensor_parallel_shape(model, entry):
            raise RuntimeError(f"{entry.key}: ZeRO-3 parameter of shape {shape}, expected "
                               f"{tensor_parallel_shape(model, entry)}")
        width = math.prod(shape[1:])
        start, stop = partition_range(param)
        first, last = start // width, -(-stop // width)  # the rows that cover [start, stop)
        rows = read_tensor_parallel_rows(model, checkpoint, entry, first, last).reshape(-1)
        with torch.no_grad():
            param.ds_tensor[: stop - start].copy_(rows[start - first * width: stop - first * width])
            param.ds_tensor[stop - start:].zero_()


def gather_partitions(param: nn.Parameter) -> Optional[torch.Tensor]:
    """The whole (tensor-parallel slice of a) ZeRO-3 parameter, of shape ds_shape, on DP rank 0 of its group;
    None on the others, which only send their partition (one dist.gather)."""
    group = param.ds_process_group
    world = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    part = param.ds_tensor.detach().to(device)
    if dist.get_rank(group) != 0:
        dist.gather(part, None, group=group, group_dst=0)
        return None
    flat = part.new_empty(world * part.numel())  # gathered in place: no second copy
    dist.gather(part, list(flat.chunk(world)), group=group, group_dst=0)
    return flat[: param.ds_numel].view(param.ds_shape)
