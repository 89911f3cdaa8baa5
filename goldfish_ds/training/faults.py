"""Fault injection for the crash-and-resume tests: a real SIGKILL of this process at a named point.

Set GOLDFISH_DS_CRASH="<point>:<step>:<rank>" (point: "step", after that optimizer step; or
"checkpoint", in the middle of writing that step's checkpoint, after DeepSpeed's files and before the
commit). Unset, it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

import torch.distributed as dist


def maybe_crash(point: str, step: int) -> None:
    spec = os.environ.get("GOLDFISH_DS_CRASH")
    if not spec:
        return
    want_point, want_step, want_rank = spec.split(":")
    if want_point == point and int(want_step) == step and int(want_rank) == dist.get_rank():
        os.kill(os.getpid(), signal.SIGKILL)
