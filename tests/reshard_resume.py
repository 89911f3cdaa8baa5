"""A `pretrain.py --resume --reshard` run that also writes the state right after the conversion (for
tests/test_reshard.py): each parameter's gathered model weight, fp32 master weight and Adam moments, saved by
rank 0 as safetensors, then the training continues as pretrain.py's would.

Usage: <launcher> tests/reshard_resume.py STATE.safetensors PRETRAIN_ARGS... (with --resume --reshard)
"""
import sys

import deepspeed
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file

from goldfish_ds.training import Job, parse_args


def main() -> None:
    path, args = sys.argv[1], parse_args(sys.argv[2:])
    job = Job(args)
    job.resume()
    state = {}
    for name, param in job.engine.module.named_parameters():  # every call below is a collective
        with deepspeed.zero.GatheredParameters([param]):
            state[f"{name}/param"] = param.detach().clone()
        state[f"{name}/fp32"] = safe_get_full_fp32_param(param)
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    job.args.resume = False  # resumed above
    job.train()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
