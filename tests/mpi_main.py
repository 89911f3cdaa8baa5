"""Entry point of the mpirun tests: the distributed test bodies on ranks started by `mpirun -np N`.

Usage (from tests/test_mpirun.py): mpirun -np N python tests/mpi_main.py HF_CHECKPOINT_DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402

from goldfish_ds.parallel import init_distributed  # noqa: E402
from test_models_llama import body_tensor_parallel  # noqa: E402
from test_parallel_cross_entropy import body_matches_single_process  # noqa: E402
from test_parallel_layers import body_collectives, body_model  # noqa: E402


def main() -> None:
    launch = init_distributed(timeout_s=120)
    assert launch.launcher == "mpirun", launch
    rank, world = launch.rank, launch.world_size
    body_collectives(rank, world)
    body_matches_single_process(rank, world)
    body_model(rank, world, 101)
    body_tensor_parallel(rank, world, sys.argv[1], 301)
    dist.barrier()
    dist.destroy_process_group()
    print(f"mpirun rank {rank}/{world}: all checks passed", flush=True)


if __name__ == "__main__":
    main()
