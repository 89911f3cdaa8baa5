"""Resume a ZeRO-3 checkpoint at another data-parallel size (`--resume --reshard`), optimizer state included.

A ZeRO-3 checkpoint holds, per data-parallel rank r and tensor-parallel rank t, one
`[bf16_]zero_pp_rank_<r>_mp_rank_<t:02d>_optim_states.pt`: for each optimizer sub-group a flat fp32 master
partition (and Adam's exp_avg / exp_avg_sq of the same shape), the concatenation, in the order of the
sub-group's parameters (`param_shapes` of the model-states file), of each parameter's piece r of
p = ceil(numel / dp) elements of its flattened (tensor-parallel slice of the) tensor, the last piece padded.
Sub-group boundaries depend on dp, so they are not carried over: each new rank finds, for every parameter
by name, the old pieces that overlap the range it owns at the new size, reads only those slices (the files
are memory-mapped) and sets its partitions through DeepSpeed's public API
(`safe_set_local_fp32_param`, `safe_set_local_optimizer_state`); its low-precision partition
(`param.ds_tensor`) becomes the fp32 master cast, as after DeepSpeed's own load. Adam's step count, the
optimizer's hyperparameters, the learning-rate schedule and DeepSpeed's step counters come from rank 0's
files. Tensor parallelism is unchanged, so the tensor-parallel slices are never merged.

DeepSpeed's universal checkpoint (`ds_to_universal.py`, `checkpoint.load_universal`) was the alternative: it
changes only the DP size under ZeRO-3 too, but needs an offline copy of the whole checkpoint and a
config change, and merges tensor-parallel slices by Megatron's per-parameter metadata, which our model
does not publish.

RNG states are not carried over (a rank of the new size has no old counterpart): no training step draws
from them. The Llama has no dropout, the goldfish masks are hashes of the tokens (the `random` strategy is
counter-based on seed, step, row and position), and the row order comes from the sampler's own seeded
generator; each rank keeps the states its start-up left.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from goldfish_ds.parallel import tensor_parallel_rank
from goldfish_ds.training.partitions import partition_range

def data_parallel_size(layout: dict) -> int:
    return layout["world_size"] // layout["tensor_parallel"]


def global_batch(layout: dict) -> int:
    """Rows per optimizer step: micro-batch x accumulation steps x data-parallel size."""
    return layout["micro_batch"] * layout["accumulation"] * data_parallel_size(layout)


def check_reshard_layout(saved: dict, new: dict) -> None:
    """A checkpoint of layout `saved` (Job.layout()) may continue at layout `new` when only the data-parallel
    size, and with it the split of the global batch into micro-batches and accumulation steps, differ; raises
    ValueError naming every other difference."""
    problems = [f"{what} {saved[key]} in the checkpoint, {new[key]} in this run{hint}"
                for key, what, hint in (
                    ("tensor_parallel", "--tensor_parallel", ": --reshard changes only the data-parallel size"),
                    ("seq_len", "--seq_len", ""))
                if saved[key] != new[key]]
    if global_batch(saved) != global_batch(new):
        problems.append(f"global batch {global_batch(saved)} rows in the checkpoint (micro-batch "
                        f"{saved['micro_batch']} x accumulation {saved['accumulation']} x {data_parallel_size(saved)} "
                        f"data-parallel ranks), {global_batch(new)} in this run ({new['micro_batch']} x "
                        f"{new['accumulation']} x {data_parallel_size(new)}): set train_micro_batch_size_per_gpu and "
                        f"gradient_accumulation_steps in --deepspeed_config so that their product is "
                        f"{global_batch(saved) // data_parallel_size(new)} at {data_parallel_size(new)} "
                        f"data-parallel ranks")
    if problems:
        raise ValueError("--resume --reshard: the checkpoint cannot continue in this layout: " + "; ".join(problems))


def resharded_sampler_state(state: dict, saved: dict, new: dict) -> dict:
    """The ShardedSampler state at layout `new` that continues the same global row order where the checkpoint
    (layout `saved`) stopped: the position counts this rank's rows of the epoch, micro_batch x accumulation
    per optimizer step, so the steps taken carry over and the position follows the new rows per step."""
    rows_per_step = saved["micro_batch"] * saved["accumulation"]
    if state["position"] % rows_per_step:
        raise ValueError(f"sampler position {state['position']} is not a whole number of optimizer steps of "
                         f"{rows_per_step} rows: the checkpoint was not written at a step boundary")
    return {**state, "position": state["position"] // rows_per_step * new["micro_batch"] * new["accumulation"]}


def _zero3_files(directory: Path, tp_rank: int) -> list[Path]:
    """The optimizer-state files of tensor-parallel rank tp_rank, by data-parallel rank."""
    pattern = re.compile(rf"(bf16_)?zero_pp_rank_(\d+)_mp_rank_{tp_rank:02d}_optim_states\.pt")
    found = {int(m.group(2)): directory / m.group(0)
             for m in map(pattern.fullmatch, (p.name for p in directory.iterdir())) if m}
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"--reshard: {directory} does not hold one ZeRO-3 optimizer-state file per data-parallel "
                         f"rank for tensor-parallel rank {tp_rank} (found ranks {sorted(found)})")
    return [found[r] for r in range(len(found))]


def _model_states(directory: Path, tp_rank: int) -> dict:
    """Data-parallel rank 0's model-states file of tensor-parallel rank tp_rank (the parameter shapes, the
    schedule, DeepSpeed's step counters)."""
    from goldfish_ds.training.checkpoint_engine import load_deepspeed_file  # imports deepspeed: after the accelerator

    path = directory / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise ValueError(f"--reshard: {directory} has no {path.name}: not a ZeRO-3 checkpoint of tensor-parallel "
                         f"rank {tp_rank} (--reshard needs zero_optimization.stage 3)")
    return load_deepspeed_file(path, "cpu")


def load_resharded(engine, directory: Path, client_state: dict, layout: dict) -> dict:
    """Load ZeRO-3 checkpoint `directory` (written at any data-parallel size, the same tensor-parallel size)
    into `engine`, this job's DeepSpeed engine with layout `layout` (Job.layout()); every rank calls it.
    `client_state` is the checkpoint's (checkpoint.read_client_state); returns it with its sampler position
    converted to this layout."""
    check_reshard_layout(client_state["layout"], layout)  # on every rank the same verdict, from the same file
    tp_rank = tensor_parallel_rank()
    states = _model_states(directory, tp_rank)
    if engine.zero_optimization_stage() != 3:
        raise ValueError(f"--reshard converts ZeRO-3 checkpoints into a ZeRO-3 run: this run's --deepspeed_config has "
                         f"zero_optimization.stage {engine.zero_optimization_stage()}")
    files = _zero3_files(directory, tp_rank)
    old_dp = len(files)
    if old_dp != states["dp_world_size"]:
        raise ValueError(f"--reshard: {directory} holds {old_dp} optimizer-state files for tensor-parallel rank "
                         f"{tp_rank}, its model states say {states['dp_world_size']} data-parallel ranks")
    from goldfish_ds.training.checkpoint_engine import load_deepspeed_file

    zero = [load_deepspeed_file(f, "cpu")["optimizer_state_dict"] for f in files]

    index = {}  # name -> (sub-group, offset of the parameter's piece in each old flat partition, numel)
    for group, shapes in enumerate(states["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            index[name] = (group, offset, math.prod(shape))
            offset += math.ceil(math.prod(shape) / old_dp)
        if offset != zero[0]["fp32_flat_groups"][group].numel():
            raise RuntimeError(f"--reshard: sub-group {group} of {files[0]} holds "
                               f"{zero[0]['fp32_flat_groups'][group].numel()} elements, its parameters {offset}")

    def saved_partition(rank: int, group: int, key: str | None) -> torch.Tensor:
        """Old rank `rank`'s flat fp32 partition of sub-group `group` (key None) or its optimizer state `key`."""
        sd = zero[rank]
        return sd["fp32_flat_groups"][group] if key is None else sd["optimizer_state_dict"]["state"][group][key]

    saved = zero[0]
    adam = saved["optimizer_state_dict"]
    steps = {float(s["step"]) for s in adam["state"].values()}
    if len(steps) != 1:
        raise RuntimeError(f"--reshard: the sub-groups of {files[0]} have different Adam step counts {steps}")
    optimizer = engine.optimizer  # DeepSpeed's ZeRO-3 optimizer around our torch AdamW
    if len(adam["param_groups"]) != len(optimizer.optimizer.param_groups):
        raise ValueError(f"--reshard: checkpoint {directory} has {len(adam['param_groups'])} optimizer parameter "
                         f"groups, this run {len(optimizer.optimizer.param_groups)}")
    for mine, theirs in zip(optimizer.optimizer.param_groups, adam["param_groups"]):
        mine.update({k: v for k, v in theirs.items() if k != "params"})  # lr, betas, weight decay, ...
    # AdamW creates its state at its first step: here, with the saved step count, before the moments are set.
    moments = [key for key, value in adam["state"][0].items() if value.dim() > 0]  # exp_avg, exp_avg_sq
    for partition in optimizer.fp32_partitioned_groups_flat:
        optimizer.optimizer.state[partition] = {key: value.clone() if value.dim() == 0 else torch.zeros_like(partition)
                                           for key, value in adam["state"][0].items()}
    optimizer.loss_scaler, optimizer.dynamic_loss_scale, optimizer.overflow = (
        saved["loss_scaler"], saved["dynamic_loss_scale"], saved["overflow"])

    optimizer.checkpoint_event_prologue()  # every parameter partitioned, as engine.load_checkpoint does
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state  # after the accelerator

    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        if name not in index:
            raise ValueError(f"--reshard: parameter {name} is not in checkpoint {directory}")
        group, offset, numel = index[name]
        if numel != param.ds_numel:
            raise ValueError(f"--reshard: parameter {name} has {param.ds_numel} elements, {numel} in checkpoint "
                             f"{directory}")
        piece = math.ceil(numel / old_dp)
        start, stop = partition_range(param)
        values = {}
        for key in (None, *moments):
            local = torch.zeros(param.ds_tensor.numel(), dtype=torch.float32)  # padding past numel stays 0
            for rank in range(start // piece, -(-stop // piece)):  # the old pieces that overlap [start, stop)
                lo, hi = max(start, rank * piece), min(stop, (rank + 1) * piece)
                source = saved_partition(rank, group, key)
                local[lo - start:hi - start] = source[offset + lo - rank * piece:offset + hi - rank * piece]
            values[key] = local
        safe_set_local_fp32_param(param, values[None])
        for key in moments:
            safe_set_local_optimizer_state(param, values[key], key)
        with torch.no_grad():
            param.ds_tensor.copy_(values[None].to(param.ds_tensor.device, param.ds_tensor.dtype))

    if optimizer.persistent_parameters:  # their full copies are stale: re-gathered by the epilogue
        optimizer.persistent_parameters[0].partition(optimizer.persistent_parameters)
    optimizer.checkpoint_event_epilogue()

    engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps, engine.global_samples, engine.skipped_steps = (
        states["global_steps"], states["global_samples"], states["skipped_steps"])
    return {**client_state,
            "sampler": resharded_sampler_state(client_state["sampler"], client_state["layout"], layout)}
