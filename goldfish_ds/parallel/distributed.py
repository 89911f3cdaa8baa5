"""One way to start torch.distributed, whoever launched the ranks: `deepspeed`, `torchrun` or `mpirun`.

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
Under mpirun (Open MPI) those come from OMPI_COMM_WORLD_*, and rank 0's host and a free port are
broadcast with mpi4py. The variables are then exported, so DeepSpeed, started afterwards in the same
process, sees the same world. A process started alone is a world of one.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun/deepspeed", "mpirun" or "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch_environment() -> LaunchEnvironment:
    """Where this process sits in the job, from the launcher's environment variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnvironment(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                                 env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                                 "torchrun/deepspeed")
    if "OMPI_COMM_WORLD_RANK" in env:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        addr, port = comm.bcast((socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None, root=0)
        return LaunchEnvironment(comm.Get_rank(), comm.Get_size(), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                                 env.get("MASTER_ADDR", addr), int(env.get("MASTER_PORT", port)), "mpirun")
    return LaunchEnvironment(0, 1, 0, "127.0.0.1", _free_port(), "single")


def init_distributed(backend: str = "", timeout_s: float = 600.0) -> LaunchEnvironment:
    """Initialise the default process group (NCCL with CUDA, else gloo) for any launcher.

    timeout_s bounds every collective: if a rank dies, the others fail with an error instead of hanging.
    """
    launch = launch_environment()
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    if not backend:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return launch
