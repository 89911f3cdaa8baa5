"""Tensor parallelism (Megatron-style) for goldfish_ds: process groups and the vocab-parallel loss."""
from goldfish_ds.parallel.cross_entropy import vocab_parallel_goldfish_cross_entropy
from goldfish_ds.parallel.state import (
    data_parallel_group,
    data_parallel_rank,
    data_parallel_world_size,
    destroy_model_parallel,
    initialize_model_parallel,
    model_parallel_is_initialized,
    tensor_parallel_group,
    tensor_parallel_rank,
    tensor_parallel_world_size,
)

__all__ = [
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
]
