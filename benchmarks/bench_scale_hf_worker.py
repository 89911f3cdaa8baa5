"""bench_scale.py's HF side: transformers' LlamaForCausalLM under DeepSpeed ZeRO-3, timed on the pipeline's batches.

Launched by bench_scale.py like the pretraining job it is compared with (`deepspeed --num_gpus N ...`): it builds
`transformers.LlamaForCausalLM` under `deepspeed.zero.Init` with the given DeepSpeed config, fills it from an HF
directory one module at a time (rank 0 reads each tensor with safetensors, `GatheredParameters(modifier_rank=0)`
broadcasts it into the partitions), wraps it with the job's AdamW and schedule, and runs optimizer steps on the rows
the job's sampler gives each data-parallel rank (same seed, micro-batch and accumulation), scoring the same
targets (our shifted labels passed as `shift_labels`). Rank 0 prints one JSON line: step times and per-phase peak
host memory of every rank.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from goldfish_ds.data import PackedTokenDataset, ShardedSampler
from goldfish_ds.models import HFCheckpoint, LlamaConfig
from goldfish_ds.parallel import data_parallel_group, init_distributed, initialize_model_parallel, mpu
from goldfish_ds.training.deepspeed_config import load_deepspeed_config
from goldfish_ds.training.metrics import peak_rss_bytes, reset_peak_rss
from goldfish_ds.training.optim import adamw, lr_scheduler
from goldfish_ds.training.trainer import select_accelerator, unlink_deepspeed_shm_buffer
from goldfish_ds.training.zero3_master_weights import fp32_master_shares_partition


def load_into_zero3(model: torch.nn.Module, directory: Path) -> None:
    """Fill a ZeRO-3 partitioned HF model from its checkpoint, module by module, read on rank 0 only."""
    import deepspeed

    checkpoint = HFCheckpoint(str(directory)) if dist.get_rank() == 0 else None
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            if checkpoint is not None:
                for name, param in params.items():
                    key = f"{prefix}.{name}" if prefix else name
                    if key == "lm_head.weight" and key not in checkpoint.files:  # tied: the embedding holds it
                        key = "model.embed_tokens.weight"
                    param.copy_(checkpoint.read(key))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", required=True, help="HF directory to load (the pipeline's export)")
    p.add_argument("--data", required=True, help="packed training data (the job's --data)")
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--seq_len", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    select_accelerator()
    import deepspeed
    import transformers

    init_distributed()
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    unlink_deepspeed_shm_buffer()
    initialize_model_parallel(1)
    dp_rank, dp_size = dist.get_rank(data_parallel_group()), dist.get_world_size(data_parallel_group())
    hf_config = transformers.AutoConfig.from_pretrained(args.hf_dir)
    ds_config = load_deepspeed_config(args.deepspeed_config, dp_size,
                                      LlamaConfig.from_json(str(Path(args.hf_dir) / "config.json")))
    micro, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    peaks = {}

    reset_peak_rss()
    with deepspeed.zero.Init(data_parallel_group=data_parallel_group(), config_dict_or_path=ds_config):
        model = transformers.LlamaForCausalLM(hf_config)
    load_into_zero3(model, Path(args.hf_dir))
    optimizer = adamw(model, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    with fp32_master_shares_partition():  # as the pipeline does: the same DeepSpeed memory in fp32
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=mpu, dist_init_required=False,
            lr_scheduler=lambda opt: lr_scheduler(opt, lr=args.lr, min_lr=args.lr / 10, warmup_steps=0,
                                                  max_steps=args.steps))
    peaks["build"] = peak_rss_bytes()

    data = PackedTokenDataset(args.data, args.seq_len)
    rows = iter(ShardedSampler(len(data), dp_rank, dp_size, seed=args.data_seed, micro_batch_size=micro,
                               accumulation_steps=accumulation))
    reset_peak_rss()
    step_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(accumulation):
            tokens = torch.stack([data[next(rows)] for _ in range(micro)])
            labels = torch.where(tokens[:, 1:] < 0, -100, tokens[:, 1:])
            loss = engine(input_ids=tokens[:, :-1].clamp_min(0), labels=labels, shift_labels=labels).loss
            engine.backward(loss)
            engine.step()
        loss.item()
        step_times.append(time.perf_counter() - start)
    peaks["train"] = peak_rss_bytes()

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, peaks)
    if dist.get_rank() == 0:
        tokens_per_step = micro * accumulation * dp_size * args.seq_len
        print("HF_RESULT " + json.dumps({"step_time_s": step_times, "tokens_per_step": tokens_per_step,
                                         "peak_rss_bytes": gathered}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
