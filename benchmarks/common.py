"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, device-aware clocks."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_samples(fns: Dict[str, Callable[[], None]], device: str, repeats: int,
                        setup: Optional[Callable[[], None]] = None, warmup: int = 1,
                        reverse_odd_rounds: bool = False) -> Dict[str, List[float]]:
    """Seconds of every call of each fn, running them in turn (ABAB...) so noise hits them alike.

    `warmup` rounds run first and are dropped; `setup` runs untimed before every call (e.g. to refill
    a buffer a previous call overwrote); `reverse_odd_rounds` runs every other round backwards (ABC CBA),
    so no fn always follows the same one.
    """
    samples = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        order = list(fns.items())
        for name, fn in (order[::-1] if reverse_odd_rounds and round_ % 2 else order):
            if setup is not None:
                setup()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: times[warmup:] for name, times in samples.items()}


def time_interleaved(fns: Dict[str, Callable[[], None]], device: str, repeats: int,
                     setup: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median seconds of each fn over `repeats` interleaved rounds, after one dropped warm-up round."""
    samples = interleaved_samples(fns, device, repeats, setup)
    return {name: statistics.median(times) for name, times in samples.items()}


def print_table(header: list, rows: list) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
