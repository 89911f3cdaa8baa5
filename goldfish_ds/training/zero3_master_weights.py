"""fp32 ZeRO-3 without a second fp32 copy of the weights (a workaround for DeepSpeed's stage-3 optimizer).

DeepSpeed's stage-3 optimizer keeps the model's partition as its fp32 master copy when the partition already is
fp32 on the optimizer's device (`DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`), and clones it otherwise.
Its test compares the partition's `torch.device` with `self.device`, a str from
`get_accelerator().current_device_name()` ('cpu', 'cuda:0'); a torch.device never equals a str, so every fp32 run
(DeepSpeed 0.19.8) clones: 20 bytes a parameter instead of 16 (fp32 weights, gradients, two AdamW moments), 4 GiB
more per 1B parameters over the data-parallel ranks. `fp32_master_shares_partition` gives that test a torch.device
while the optimizer builds its partitions, so the branch DeepSpeed wrote for this case (torch autocast's fp32
weights) is taken; everything else, including each tensor's device, is unchanged. Where the partition is not fp32
(bf16/fp16 mixed precision) or the optimizer state is offloaded, DeepSpeed's behaviour is unchanged too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def fp32_master_shares_partition() -> Iterator[None]:
    """Within this context, a ZeRO-3 optimizer built over fp32 partitions uses them as its master weights."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    create = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions

    def create_sharing_fp32_partitions(optimizer: DeepSpeedZeroOptimizer_Stage3) -> None:
        device = optimizer.device
        if not optimizer.offload_optimizer and isinstance(device, str):
            optimizer.device = torch.device(device)
        try:
            create(optimizer)
        finally:
            optimizer.device = device

    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create_sharing_fp32_partitions
    try:
        yield
    finally:
        DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create

