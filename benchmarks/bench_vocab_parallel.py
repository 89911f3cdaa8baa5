"""Vocab-parallel goldfish cross-entropy: per-rank time at TP=2 vs TP=1, and bytes on the wire.

Both sides run with the same number of threads per rank (default 1: the two TP ranks then use the two
cores of a small machine), forward + backward in the default training mode (gradient in place), goldfish
k=4 h=13. Usage: python benchmarks/bench_vocab_parallel.py [--shape 8192x32000] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from distributed import run_distributed  # noqa: E402

from goldfish_ds import GoldfishConfig  # noqa: E402
from goldfish_ds.parallel import vocab_parallel_goldfish_cross_entropy  # noqa: E402

CFG = GoldfishConfig(k=4, h=13)


def time_loss(N: int, V_local: int, group, repeats: int) -> float:
    """Median seconds of forward + backward on [N, V_local] local logits."""
    source = torch.randn(N, V_local, generator=torch.Generator().manual_seed(dist.get_rank() if group else 0))
    labels = torch.randint(0, V_local * (dist.get_world_size(group) if group else 1), (N,),
                           generator=torch.Generator().manual_seed(1))
    logits = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        logits.copy_(source)
        logits.requires_grad_(True)
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        loss = vocab_parallel_goldfish_cross_entropy(logits, labels, CFG, group)
        torch.autograd.grad(loss, logits)
        times.append(time.perf_counter() - start)
        logits.requires_grad_(False)
    return statistics.median(times[1:])


def rank_body(rank: int, world: int, N: int, V: int, repeats: int, threads: int, results) -> None:
    torch.set_num_threads(threads)
    results[rank] = time_loss(N, V // world, dist.group.WORLD, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8192x32000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank, on both sides")
    args = parser.parse_args()
    N, V = map(int, args.shape.split("x"))
    torch.set_num_threads(args.threads)
    tp1 = time_loss(N, V, None, args.repeats)
    results = mp.Manager().dict()
    run_distributed(rank_body, 2, N, V, args.repeats, args.threads, results)
    tp2 = max(results.values())  # the slower rank sets the step time
    sent = 4 * N + 4 * 2 * N  # all-reduce payloads: MAX of [N] floats, SUM of [2, N] floats
    gather = 4 * N * V
    print(f"shape={N}x{V} fp32, threads per rank={args.threads}, repeats={args.repeats} (median, fwd+bwd)")
    print(f"  TP=1 time          {tp1 * 1e3:8.1f} ms")
    print(f"  TP=2 per-rank time {tp2 * 1e3:8.1f} ms   ratio TP=2/TP=1 = {tp2 / tp1:.2f}")
    print(f"  all-reduce payload per rank per call: {sent / 1e3:.1f} kB (2 all-reduces)   "
          f"a gather of the logits: {gather / 1e6:.1f} MB   ({gather / sent:.0f}x more)")


if __name__ == "__main__":
    main()
