"""AdamW and its learning-rate schedule: linear warmup, then cosine decay to a floor (the official recipe)."""
from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): lr * (step + 1) / warmup during warmup, then a
    cosine from lr down to min_lr at max_steps, and min_lr after."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def adamw(model: nn.Module, *, lr: float, betas: tuple, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) and none on norm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and _is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not _is_matrix(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def _is_matrix(p: torch.Tensor) -> bool:
    # Under ZeRO-3 construction a parameter's data is a placeholder; ds_shape keeps its real shape.
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def lr_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                 max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` (whose base lr is `lr`) following warmup_cosine_lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_lr(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                                                 max_steps=max_steps) / lr)
