"""Pretrain or continue-pretrain a Llama with the goldfish loss on DeepSpeed ZeRO (+ tensor parallelism).

  deepspeed --num_gpus 8 scripts/pretrain.py --deepspeed_config configs/deepspeed/zero3_gpu_bf16.json ...
  mpirun -np 4 python scripts/pretrain.py ...          torchrun --nproc_per_node 2 scripts/pretrain.py ...
  python scripts/pretrain.py                           (no arguments: the tiny built-in CPU demo)
  goldfish-pretrain ...                                (the same job as an installed command)

Several hosts: the README's Multi-node section (hostfile, --master_addr, --network_interface, --dist_timeout).
Every option is listed by --help; `--config run.json` supplies them from a file (see configs/train/).
Bad inputs (data, tokenizer, DeepSpeed config, goldfish options) stop the job before training starts.
Exit status 75: SIGTERM/SIGUSR1 or --exit_after_minutes stopped it after a checkpoint; continue with --resume.
"""
from __future__ import annotations

import json
import socket
import sys
import traceback
from typing import List, Optional

import torch.distributed as dist

from goldfish_ds.training import Job, parse_args
from goldfish_ds.training.anomalies import TooManySkippedSteps
from goldfish_ds.training.checkpoint import CheckpointError
from goldfish_ds.training.preemption import PREEMPTED_EXIT_STATUS


def main(argv: Optional[List[str]] = None) -> None:
    try:
        job = Job(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"pretrain.py: error: {e}")
    try:
        summary = job.train()
    except (TooManySkippedSteps, CheckpointError, ValueError, FileNotFoundError) as e:
        # raised on every rank: a run of skipped steps, a save that failed on some rank, a damaged checkpoint or
        # one that does not fit this run (--resume's checks)
        sys.exit(f"pretrain.py: error: {e}")
    except RuntimeError as e:  # gloo and NCCL report a failed collective as a RuntimeError
        if dist.get_world_size() == 1:
            raise
        traceback.print_exc()
        sys.exit(f"pretrain.py: error: rank {dist.get_rank()} on {socket.gethostname()} stopped in step "
                 f"{job.step + 1}: {str(e).splitlines()[0]}\npretrain.py: a collective that times out or loses its "
                 f"connection means another rank or host of the job stopped, or was unreachable for --dist_timeout "
                 f"({job.args.dist_timeout:g} s); continue with --resume (latest complete checkpoint: "
                 f"{job.checkpoints.latest_tag()})")
    if dist.get_rank() == 0:
        print(json.dumps(summary, indent=1))
    dist.destroy_process_group()
    if summary["stopped"]:
        sys.exit(PREEMPTED_EXIT_STATUS)  # stopped early by a signal or --exit_after_minutes, after a checkpoint


if __name__ == "__main__":
    main()
