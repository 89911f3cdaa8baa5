"""Run a test body on real torch.distributed ranks (gloo on CPU), spawned with torch.multiprocessing."""
from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=120)  # a dead or stuck rank fails the test instead of hanging it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, body: Callable[..., Any], args: tuple) -> None:
    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints every thread's Python stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        body(rank, world_size, *args)
        # What the body built (a DeepSpeed engine, the gloo work objects it holds and their tensors) goes before
        # the groups do, and no rank closes its connections while another still uses them: gloo work alive at
        # interpreter exit can abort the rank (std::terminate; pytorch PR 179291).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(body: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call body(rank, world_size, *args) on world_size gloo ranks; any rank's exception fails the caller."""
    mp.spawn(_worker, args=(world_size, free_port(), body, args), nprocs=world_size, join=True)
