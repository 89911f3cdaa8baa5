"""The DeepSpeed config of a run, checked against the world before anything is built."""
from __future__ import annotations

import json
from pathlib import Path


def load_deepspeed_config(path: str, data_parallel_size: int) -> dict:
    """Read a DeepSpeed JSON config and check its batch sizes against the data-parallel size.

    The micro-batch size (`train_micro_batch_size_per_gpu`) is required; `gradient_accumulation_steps`
    defaults to 1; a `train_batch_size`, if given, must equal micro x accumulation x data-parallel size.
    The optimizer and schedule come from our options (AdamW, warmup + cosine), so `optimizer` and
    `scheduler` sections are refused rather than silently ignored.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path!r} does not exist")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
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
