"""Fused goldfish cross-entropy vs torch: speed and extra memory, measured side by side in one run.

For each shape and dtype, in the default training mode (logits fresh from the LM head, gradient written
into their buffer), it times forward + backward of
  torch     F.cross_entropy on goldfish-masked labels (torch.autograd.grad, so no accumulation copy)
  fused     goldfish_cross_entropy (k=4, h=13)
  copy      an in-place copy of the same buffer (the floor: one read and one write)
and the extra peak memory of each loss beyond the logits (CPU: peak RSS of a fresh process;
CUDA: torch.cuda.max_memory_allocated). Usage:
  python benchmarks/bench_loss.py [--device cpu|cuda] [--repeats 5] [--cases 4096x32000:fp32 ...]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, synchronize, time_interleaved  # noqa: E402

from goldfish_ds import GoldfishConfig, apply_goldfish, goldfish_cross_entropy  # noqa: E402

CFG = GoldfishConfig(k=4, h=13)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_CASES = ["4096x32000:fp32", "4096x32000:bf16", "8192x32000:fp32", "8192x32000:bf16", "2048x128256:fp32"]


def make_inputs(N: int, V: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    source = torch.randn(N, V, generator=g, device=device).to(dtype)
    labels = torch.randint(0, V, (1, N), generator=g, device=device)
    return source, labels


def run_loss(method: str, logits: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor) -> None:
    logits.requires_grad_(True)
    if method == "torch":
        loss = F.cross_entropy(logits, masked.reshape(-1))
    else:
        loss = goldfish_cross_entropy(logits, labels.reshape(-1), CFG)
    torch.autograd.grad(loss, logits)
    logits.requires_grad_(False)


def extra_memory_fraction(method: str, N: int, V: int, dtype_name: str, device: str) -> float:
    """Peak memory a loss call adds beyond its logits, as a fraction of the logits' bytes."""
    if device.startswith("cuda"):
        source, labels = make_inputs(N, V, DTYPES[dtype_name], device)
        masked = apply_goldfish(labels, CFG)
        logits = source.clone()
        del source
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_loss(method, logits, labels, masked)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / logits.nbytes
    # On the CPU, a fresh process: its peak RSS (VmHWM) after the call minus before it.
    out = subprocess.run([sys.executable, __file__, "--memory-probe", method, f"{N}x{V}:{dtype_name}"],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; unlike ru_maxrss it is not inherited from the parent)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def memory_probe(method: str, case: str) -> None:
    (N, V), dtype_name = map(int, case.split(":")[0].split("x")), case.split(":")[1]
    source, labels = make_inputs(N, V, DTYPES[dtype_name], "cpu")
    masked = apply_goldfish(labels, CFG)
    logits = source
    logits.add_(0)  # touch every page
    small = logits[:64].clone()
    run_loss(method, small, labels[:, :64], masked[:, :64])  # one-time costs (thread pool, code pages) first
    del small
    before = peak_rss_bytes()
    run_loss(method, logits, labels, masked)
    after = peak_rss_bytes()
    print((after - before) / logits.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per method (median reported)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="NxV:dtype, dtype in fp32/bf16")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(*args.memory_probe)

    rows, results = [], []
    for case in args.cases:
        shape, dtype_name = case.split(":")
        N, V = map(int, shape.split("x"))
        source, labels = make_inputs(N, V, DTYPES[dtype_name], args.device)
        masked = apply_goldfish(labels, CFG)
        logits = torch.empty_like(source)
        times = time_interleaved(
            {
                "torch": lambda: run_loss("torch", logits, labels, masked),
                "fused": lambda: run_loss("fused", logits, labels, masked),
                "copy": lambda: logits.copy_(source),
            },
            args.device,
            args.repeats,
            setup=lambda: logits.copy_(source),
        )
        del source, logits
        synchronize(args.device)
        memory = {m: extra_memory_fraction(m, N, V, dtype_name, args.device) for m in ("torch", "fused")}
        gbytes = 2 * N * V * DTYPES[dtype_name].itemsize / 1e9  # one read of the logits + one write of the grad
        result = dict(case=case, **{f"{k}_s": v for k, v in times.items()},
                      speedup_vs_torch=times["torch"] / times["fused"], fused_over_copy=times["fused"] / times["copy"],
                      fused_GBps=gbytes / times["fused"], copy_GBps=gbytes / times["copy"],
                      extra_mem_torch=memory["torch"], extra_mem_fused=memory["fused"])
        results.append(result)
        rows.append([case, f"{times['torch'] * 1e3:.1f}", f"{times['fused'] * 1e3:.1f}", f"{times['copy'] * 1e3:.1f}",
                     f"{result['speedup_vs_torch']:.1f}x", f"{result['fused_over_copy']:.2f}",
                     f"{100 * result['fused_GBps'] / result['copy_GBps']:.0f}%",
                     f"{100 * memory['torch']:.0f}%", f"{100 * memory['fused']:.2f}%"])
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (median ms; fwd+bwd; goldfish k=4 h=13)")
    print_table(["case", "torch ms", "fused ms", "copy ms", "fused vs torch", "fused/copy", "of copy GB/s",
                 "torch extra mem", "fused extra mem"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
