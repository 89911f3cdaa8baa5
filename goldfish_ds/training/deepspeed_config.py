"""The DeepSpeed config of a run: checked against the world, and its "auto" sizes fitted to the model."""
from __future__ import annotations

import json
from pathlib import Path

from goldfish_ds.models import LlamaConfig


def decoder_layer_numel(model: LlamaConfig) -> int:
    """Parameters of one Llama decoder layer: q, k, v, o projections, the SwiGLU MLP and two RMSNorms."""
    h, kv = model.hidden_size, model.num_key_value_heads * model.head_dim
    return h * (2 * h + 2 * kv) + 3 * h * model.intermediate_size + 2 * h


def auto_sizes(model: LlamaConfig) -> dict[str, int]:
    """The value, in elements, of each `zero_optimization` size a DeepSpeed config may give as "auto".

    With h = hidden_size and L = decoder_layer_numel(model) (about 12 h^2 for a Llama):
      reduce_bucket_size, allgather_bucket_size = h^2   gradients are reduced (ZeRO 1-2: updated parameters
                                                          gathered) in buckets of one attention projection
      stage3_prefetch_bucket_size = 0.9 h^2               parameters gathered ahead of the module that needs them
      stage3_param_persistence_threshold = 10 h           vectors (the norms) stay whole on every rank, every
                                                          matrix is partitioned
      stage3_max_live_parameters = L                      prefetching stops while a layer's worth is gathered
      stage3_max_reuse_distance = L                       a gathered parameter is kept only when it is used
                                                          again within a layer's worth of parameters (the
                                                          recompute of activation checkpointing and its backward)
      sub_group_size = L                                  the optimizer steps the rank's partition a layer's
                                                          worth at a time (its flat gradient copy and AdamW's
                                                          temporaries are that large)
    DeepSpeed's own defaults (5e8, 5e8, 5e7, 1e5, 1e9, 1e9, 1e9) do not depend on the model: a ZeRO-3 rank
    then holds every gradient of a model under 5e8 parameters in one reduce bucket, keeps each gathered
    parameter from its forward to its backward, and copies its whole gradient partition for the step.
    The first three formulas are those of DeepSpeed's autotuner and HF Trainer's "auto". The counts are the
    whole model's; under tensor parallelism a rank's share of a layer is smaller still.
    """
    h, layer = model.hidden_size, decoder_layer_numel(model)
    return {"reduce_bucket_size": h * h, "allgather_bucket_size": h * h,
            "stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h,
            "stage3_max_live_parameters": layer, "stage3_max_reuse_distance": layer, "sub_group_size": layer}


def _refuse_auto(value, where: str, path: str, allowed: list[str]) -> None:
    """Raise for any "auto" left in a (nested) config value; where: its dotted name."""
    if value == "auto":
        raise ValueError(f"--deepspeed_config {path}: {where} is \"auto\"; only these zero_optimization sizes may "
                         f"be \"auto\": {', '.join(allowed)}")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_auto(item, f"{where}.{key}" if where else key, path, allowed)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_auto(item, f"{where}[{i}]", path, allowed)


def load_deepspeed_config(path: str, data_parallel_size: int, model: LlamaConfig) -> dict:
    """Read a DeepSpeed JSON config, check its batch sizes against the data-parallel size, resolve its "auto"s.

    The micro-batch size (`train_micro_batch_size_per_gpu`) is required; `gradient_accumulation_steps`
    defaults to 1; a `train_batch_size`, if given, must equal micro x accumulation x data-parallel size.
    The optimizer and schedule come from our options (AdamW, warmup + cosine), so `optimizer` and
    `scheduler` sections are refused rather than silently ignored. A `zero_optimization` size named
    by auto_sizes given as "auto" becomes its value for the model; "auto" anywhere else is refused.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path!r} does not exist")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
    zero, sizes = config.get("zero_optimization", {}), auto_sizes(model)
    for name, size in sizes.items():
        if zero.get(name) == "auto":
            zero[name] = size
    _refuse_auto(config, "", path, list(sizes))
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"--deepspeed_config {path}: remove the {section!r} section; the optimizer is AdamW with "
                             "warmup + cosine decay, set by --lr, --min_lr, --warmup_steps, --beta1, --beta2, "
                             "--weight_decay")
    micro = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.setdefault("gradient_accumulation_steps", 1)
    for name, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accumulation)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--deepspeed_config {path}: {name} must be a positive integer, got {value!r}")
    expected = micro * accumulation * data_parallel_size
    total = config.get("train_batch_size", expected)
    if total != expected:
        raise ValueError(f"--deepspeed_config {path}: train_batch_size {total} != train_micro_batch_size_per_gpu "
                         f"{micro} x gradient_accumulation_steps {accumulation} x data-parallel size "
                         f"{data_parallel_size} (= {expected}); fix the config or the number of ranks")
    config["train_batch_size"] = expected
    config["zero_allow_untested_optimizer"] = True  # our AdamW is torch's, which ZeRO handles
    return config
