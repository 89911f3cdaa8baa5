"""Pretrain or continue-pretrain a Llama with the goldfish loss on DeepSpeed ZeRO (+ tensor parallelism).

  deepspeed --num_gpus 8 scripts/pretrain.py --deepspeed_config configs/deepspeed/zero3_gpu_bf16.json ...
  mpirun -np 4 python scripts/pretrain.py ...          torchrun --nproc_per_node 2 scripts/pretrain.py ...
  python scripts/pretrain.py                           (no arguments: the tiny built-in CPU demo)

Every option is listed by --help; `--config run.json` supplies them from a file (see configs/train/).
Bad inputs (data, tokenizer, DeepSpeed config, goldfish options) stop the job before training starts.
"""
import json
import sys

import torch.distributed as dist

from goldfish_ds.training import Job, parse_args


def main() -> None:
    try:
        job = Job(parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"pretrain.py: error: {e}")
    summary = job.train()
    if dist.get_rank() == 0:
        print(json.dumps(summary, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
