"""The distributed test bodies on ranks started by a launcher, which init_distributed must recognise.

Usage (from tests/test_launchers.py): mpirun -np N python tests/launched_checks.py mpirun HF_CHECKPOINT_DIR
                                      torchrun --nproc_per_node N tests/launched_checks.py torchrun/deepspeed DIR
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
    assert launch.launcher == sys.argv[1], launch
    rank, world = launch.rank, launch.world_size
    body_collectives(rank, world)
    body_matches_single_process(rank, world)
    body_model(rank, world, 101)
    body_tensor_parallel(rank, world, sys.argv[2], 301)
    dist.barrier()
    dist.destroy_process_group()
    print(f"{launch.launcher} rank {rank}/{world}: all checks passed", flush=True)


if __name__ == "__main__":
    main()
