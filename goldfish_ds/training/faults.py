"""Fault injection for the reliability tests: real signals and poisoned losses at named points of a job.

GOLDFISH_DS_CRASH holds one or more comma-separated faults "<point>:<steps>:<rank>[:<arg>]". <steps> is an
optimizer step as metrics.jsonl numbers it (1-based), or an inclusive range "A-B"; <rank> the global rank
that faults. Points:

- "step": after that optimizer step, this process sends itself a real signal: <arg> names it (KILL, the
  default, TERM, USR1...).
- "checkpoint": the same, in the middle of writing that step's checkpoint (after DeepSpeed's files, before
  the commit).
- "validation": the same, in the middle of that step's validation pass.
- "hold": after that step, the rank creates the file <arg> and waits until it receives a stop signal (the
  test sends one to the launcher when the file appears, so the signal lands at a known step).
- "nan_loss": that rank's loss of every micro-batch of that step becomes NaN (its gradients stay finite:
  the trainer must see the loss itself).
- "nan_grad": that rank's loss stays as it is, its gradients become NaN.

Unset, every hook costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

ENV = "GOLDFISH_DS_CRASH"


def _faults(point: str, step: int) -> list[str]:
    """The <arg> of every fault in GOLDFISH_DS_CRASH at this point, step and rank."""
    found = []
    for fault in os.environ[ENV].split(","):
        fields = fault.split(":", 3)
        if len(fields) < 3:
            raise ValueError(f"{ENV}: {fault!r} is not <point>:<steps>:<rank>[:<arg>]")
        want_point, steps, want_rank = fields[:3]
        first, _, last = steps.partition("-")
        if want_point == point and int(first) <= step <= int(last or first) and int(want_rank) == dist.get_rank():
            found.append(fields[3] if len(fields) == 4 else "")
    return found


def maybe_crash(point: str, step: int) -> None:
    """At a signal point ("step", "checkpoint", "validation"): send this process the signal a fault names."""
    if not os.environ.get(ENV):
        return
    for name in _faults(point, step):
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))


def maybe_hold(step: int, stop_received: Callable[[], bool]) -> None:
    """After optimizer `step`: create the "hold" fault's file and wait until `stop_received()` is true."""
    if not os.environ.get(ENV):
        return
    for path in _faults("hold", step):
        Path(path).touch()
        while not stop_received():
            time.sleep(0.01)


class _NaNGradient(torch.autograd.Function):
    """The identity, whose backward pass returns NaN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def maybe_poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss of optimizer `step` (1-based), or a NaN one, or one with NaN gradients, as faults say."""
    if not os.environ.get(ENV):
        return loss
    if _faults("nan_loss", step):
        loss = loss + float("nan")
    if _faults("nan_grad", step):
        loss = _NaNGradient.apply(loss)
    return loss
