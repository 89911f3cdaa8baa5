"""One optimizer step of the pretraining job that also writes the gradient it applies (for
tests/test_loss_normalization.py): Job.train_step runs as pretrain.py's loop runs it, and right before the
step's last engine.step() (the optimizer update) every parameter's accumulated, data-parallel-reduced gradient
is read with deepspeed.utils.safe_get_full_grad (before clipping) and written by rank 0 in the HF layout
(tensor-parallel slices joined, vocabulary padding stripped) to GRADS_DIR/model.safetensors; the step's
"train" record goes to GRADS_DIR/record.json.

Usage: <launcher> tests/loss_normalization_grads.py GRADS_DIR PRETRAIN_ARGS...
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from goldfish_ds.models import save_hf_llama
from goldfish_ds.training import Job, parse_args


def main() -> None:
    out, args = Path(sys.argv[1]), parse_args(sys.argv[2:])
    job = Job(args)
    engine, apply_step = job.engine, job.engine.step

    def full_gradient(param):
        gradient = safe_get_full_grad(param)  # a collective over the data-parallel group: every rank calls it
        return gradient if job.dp_rank == 0 else None  # the writer's tensor-parallel group

    def step_writing_gradients() -> None:
        if engine.is_gradient_accumulation_boundary():
            save_hf_llama(engine.module, str(out), local_tensor=full_gradient)
        apply_step()

    engine.step = step_writing_gradients
    record = job.train_step(iter(job.sampler))
    if dist.get_rank() == 0:
        (out / "record.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
