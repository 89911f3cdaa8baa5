"""Tensor parallelism (Megatron-style) for goldfish_ds: process groups and the vocab-parallel loss."""
from goldfish_ds.parallel.cross_entropy import vocab_parallel_goldfish_cross_entropy
from goldfish_ds.parallel.distributed import LaunchEnvironment, init_distributed, launch_environment
from goldfish_ds.parallel.layers import (ColumnParallelLinear, LossTargets, RowParallelLinear,
                                         VocabParallelEmbedding, VocabParallelLMHead)
from goldfish_ds.parallel.linear_cross_entropy import vocab_parallel_goldfish_linear_cross_entropy
from goldfish_ds.parallel.mappings import (copy_to_tensor_parallel_region, gather_from_tensor_parallel_region,
                                           reduce_from_tensor_parallel_region, scatter_to_tensor_parallel_region)
from goldfish_ds.parallel.state import (
    data_parallel_group,
    data_parallel_rank,
    data_parallel_world_size,
    destroy_model_parallel,
    initialize_model_parallel,
    model_parallel_is_initialized,
    mpu,
    tensor_parallel_group,
    tensor_parallel_rank,
    tensor_parallel_world_size,
)

__all__ = [
    "LaunchEnvironment",
    "init_distributed",
    "launch_environment",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "LossTargets",
    "copy_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "mpu",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "data_parallel_group",
    "data_parallel_rank",
    "data_parallel_world_size",
    "destroy_model_parallel",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "tensor_parallel_group",
    "tensor_parallel_rank",
    "tensor_parallel_world_size",
    "vocab_parallel_goldfish_cross_entropy",
    "vocab_parallel_goldfish_linear_cross_entropy",
]
