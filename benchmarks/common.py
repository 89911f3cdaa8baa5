"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, device-aware clocks."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], None]], device: str, repeats: int,
                     setup: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median seconds of each fn, running them in turn `repeats` times so noise hits them alike.

    `setup` runs untimed before every call (e.g. to refill a buffer a previous call overwrote).
    """
    samples = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for name, fn in fns.items():
            if setup is not None:
                setup()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times[1:]) for name, times in samples.items()}


def print_table(header: list, rows: list) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
