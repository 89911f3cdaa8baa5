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
                        reverse_odd_rounds: bool = False, calls: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each fn, in samples taken in turn (ABAB...) so noise hits them alike.

    A sample times `calls` back-to-back calls and divides by `calls`: calls=1 times a call right after
    the other fns ran (their memory traffic left in the caches); calls > 1 measures throughput, the rate
    of repeated calls, as a loop of them runs.
    `warmup` rounds run first and are dropped; `setup` runs untimed before every sample (e.g. to refill
    a buffer a previous call overwrote; use calls=1 then); `reverse_odd_rounds` runs every other round
    backwards (ABC CBA), so no fn always follows the same one.
    """
    samples = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        order = list(fns.items())
        for name, fn in (order[::-1] if reverse_odd_rounds and round_ % 2 else order):
            if setup is not None:
                setup()
            samples[name].append(_seconds_per_call(fn, device, calls))
    return {name: times[warmup:] for name, times in samples.items()}


def _seconds_per_call(fn: Callable[[], None], device: str, calls: int = 1) -> float:
    """Seconds per call of `calls` back-to-back calls of fn, started after the device's queued work: timed by
    CUDA events on a GPU (the stream's own clock), perf_counter otherwise."""
    synchronize(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls  # elapsed_time is in milliseconds
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def time_interleaved(fns: Dict[str, Callable[[], None]], device: str, repeats: int,
                     setup: Optional[Callable[[], None]] = None, calls: int = 1) -> Dict[str, float]:
    """Median seconds per call of each fn over `repeats` interleaved rounds, after one dropped warm-up round."""
    samples = interleaved_samples(fns, device, repeats, setup, calls=calls)
    return {name: statistics.median(times) for name, times in samples.items()}


def print_table(header: list, rows: list) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
