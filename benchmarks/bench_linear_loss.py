"""LM head + goldfish loss: torch, today's pipeline and the fused linear cross-entropy, side by side in one run.

For each shape H x V (LM head weight [V, H]), N rows of hidden [N, H] and dtype, it times forward + backward
(torch.autograd.grad for dL/dhidden and dL/dweight, so no accumulation copy) of
  torch   logits = F.linear(hidden, weight); F.cross_entropy on goldfish-masked labels (apply_goldfish)
  today   logits = F.linear(hidden, weight); goldfish_cross_entropy (gradient written into the logits buffer)
  fused   goldfish_linear_cross_entropy (kept rows only enter the matmuls, logits one chunk at a time)
  liger   --device cuda only, if liger_kernel is importable: LigerFusedLinearCrossEntropyLoss on the masked labels
with goldfish k=4 h=13 (hash-table), in interleaved rounds (median after one dropped warm-up round), and each
method's extra peak memory: the peak above what the inputs and the two gradients take, printed beside the N x V
logits the unfused paths allocate. CPU: the RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) of a
second call in a fresh process per method and case, run with MALLOC_MMAP_THRESHOLD_=131072 so freed temporaries
leave the RSS; CUDA: torch.cuda.max_memory_allocated (after the timed calls), and CUDA events for time. Usage:
  python benchmarks/bench_linear_loss.py [--device cpu|cuda] [--shapes 2048x128256 4096x32000] [--n 4096 8192]
                                         [--dtypes fp32 bf16] [--repeats 3] [--chunk_fraction 0.05]
                                         [--json results.json]
The default run is long on a small CPU (each torch call at 8192 x 2048 x 128256 costs three 4.3 TFLOP GEMMs);
validate on a small case first, e.g. --shapes 256x4096 --n 512 --dtypes fp32 --repeats 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, synchronize, time_interleaved  # noqa: E402

from goldfish_ds import GoldfishConfig, apply_goldfish, cpu_capability, goldfish_cross_entropy  # noqa: E402
from goldfish_ds import goldfish_linear_cross_entropy  # noqa: E402
from goldfish_ds.training.metrics import peak_rss_bytes, reset_peak_rss  # noqa: E402

CFG = GoldfishConfig(k=4, h=13)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("torch", "today", "fused")
# Issue 15's targets for the fused op (CPU), and on a GPU against Liger's fused linear cross-entropy.
MAX_EXTRA_MEMORY = 0.05  # of the N x V logits
MAX_TIME_VS_TODAY = 0.85
MIN_SPEEDUP_VS_TORCH = 3.0


def parse_shape(text: str) -> Tuple[int, int]:
    """'HxV' -> (H, V), both positive."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(map(int, match.groups())) < 1:
        raise argparse.ArgumentTypeError(f"expected HxV with positive integers (e.g. 2048x128256), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: str):
    """hidden [N, H] and weight [V, H] (logits about unit variance), both requiring grad, and labels [N] in [0, V)."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, device=device) * H ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    return hidden, weight, labels


def loss_of(method: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor,
            chunk_bytes: Optional[int]) -> torch.Tensor:
    """The mean goldfish loss over kept targets, by `method` (labels: the targets; masked: dropped ones ignored;
    chunk_bytes: the fused op's chunk budget, None for its default)."""
    if method == "torch":
        return F.cross_entropy(F.linear(hidden, weight), masked, ignore_index=CFG.ignore_index)
    if method == "today":
        return goldfish_cross_entropy(F.linear(hidden, weight), labels, CFG)
    if method == "fused":
        return goldfish_linear_cross_entropy(hidden, weight, labels, CFG, chunk_bytes=chunk_bytes)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss(ignore_index=CFG.ignore_index)(weight, hidden, masked)


def forward_backward(method: str, hidden, weight, labels, masked, chunk_bytes: Optional[int]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """dL/dhidden and dL/dweight of the loss by `method`."""
    return torch.autograd.grad(loss_of(method, hidden, weight, labels, masked, chunk_bytes), (hidden, weight))


def extra_peak_bytes(method: str, hidden, weight, labels, masked, chunk_bytes: Optional[int], device: str) -> int:
    """Peak memory of one forward + backward above what the inputs (held before) and the two gradients take."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = forward_backward(method, hidden, weight, labels, masked, chunk_bytes)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = reset_peak_rss()
        if base is None:
            raise RuntimeError("bench_linear_loss: CPU memory is measured through /proc/self (Linux only)")
        grads = forward_backward(method, hidden, weight, labels, masked, chunk_bytes)
        peak = peak_rss_bytes()
    return peak - base - sum(g.nbytes for g in grads)


def memory_probe(method: str, N: int, H: int, V: int, dtype_name: str, chunk_bytes: Optional[int]) -> None:
    """In a fresh process: print the extra peak bytes of a CPU call in steady state, i.e. of a second call (the
    first pays one-time costs: thread pools, code pages, the GEMMs' buffers for these shapes, about 10 MiB)."""
    hidden, weight, labels = make_inputs(N, H, V, DTYPES[dtype_name], "cpu")
    masked = apply_goldfish(labels, CFG)
    forward_backward(method, hidden, weight, labels, masked, chunk_bytes)
    print(extra_peak_bytes(method, hidden, weight, labels, masked, chunk_bytes, "cpu"))


def cpu_extra_peak_bytes(method: str, N: int, H: int, V: int, dtype_name: str, chunk_bytes: Optional[int]) -> int:
    """extra_peak_bytes on the CPU, measured in a fresh child process (its own VmHWM, no heap left by others)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--memory-probe", method, str(N), str(H), str(V), dtype_name,
                          str(chunk_bytes)], check=True, capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    """What the benchmark ran on: the GPU's name, or the CPU's model name and our kernels' SIMD level."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    return f"{model.group(1) if model else 'unknown CPU'} ({os.cpu_count()} CPUs, kernels {cpu_capability()})"


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def bench_case(N: int, H: int, V: int, dtype_name: str, methods: List[str], device: str, repeats: int,
               chunk_fraction: Optional[float]) -> Dict:
    """Times and extra peak memory of every method on one case (the fused op's chunk budget: chunk_fraction of
    the logits, None for its default)."""
    logits_bytes = N * V * DTYPES[dtype_name].itemsize
    chunk_bytes = None if chunk_fraction is None else max(1, int(chunk_fraction * logits_bytes))
    hidden, weight, labels = make_inputs(N, H, V, DTYPES[dtype_name], device)
    masked = apply_goldfish(labels, CFG)
    kept = masked.ne(CFG.ignore_index).float().mean().item()
    times = time_interleaved({m: (lambda m=m: forward_backward(m, hidden, weight, labels, masked, chunk_bytes))
                              for m in methods}, device, repeats)
    if device.startswith("cuda"):
        memory = {m: extra_peak_bytes(m, hidden, weight, labels, masked, chunk_bytes, device) for m in methods}
    else:
        del hidden, weight  # the child processes need the room
        memory = {m: cpu_extra_peak_bytes(m, N, H, V, dtype_name, chunk_bytes) for m in methods}
    synchronize(device)
    return dict(N=N, H=H, V=V, dtype=dtype_name, kept_fraction=kept, logits_bytes=logits_bytes, chunk_bytes=chunk_bytes,
                **{f"{m}_s": times[m] for m in methods}, **{f"{m}_extra_bytes": memory[m] for m in methods})


def table_row(r: Dict, methods: List[str]) -> list:
    fused_vs_today = r["fused_s"] / r["today_s"]
    speedup = r["torch_s"] / r["fused_s"]
    fused_memory = r["fused_extra_bytes"] / r["logits_bytes"]
    row = [f"{r['N']}x{r['H']}x{r['V']}:{r['dtype']}", size(r["logits_bytes"]),
           *(f"{r[f'{m}_s'] * 1e3:.1f}" for m in methods),
           f"{fused_vs_today:.2f} {verdict(fused_vs_today <= MAX_TIME_VS_TODAY)}",
           f"{speedup:.1f}x {verdict(speedup >= MIN_SPEEDUP_VS_TORCH)}",
           *(f"{100 * r[f'{m}_extra_bytes'] / r['logits_bytes']:.0f}%" for m in methods if m != "fused"),
           f"{size(r['fused_extra_bytes'])} = {100 * fused_memory:.2f}% {verdict(fused_memory <= MAX_EXTRA_MEMORY)}"]
    if "liger" in methods:
        fused_vs_liger = r["fused_s"] / r["liger_s"]
        less_memory = r["fused_extra_bytes"] < r["liger_extra_bytes"]
        row.append(f"{fused_vs_liger:.2f} {verdict(fused_vs_liger <= 1 and less_memory)}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(2048, 128256), (4096, 32000)],
                        metavar="HxV", help="hidden size x vocabulary (default: 2048x128256 4096x32000)")
    parser.add_argument("--n", nargs="+", type=int, default=[4096, 8192], help="rows (tokens) N (default: 4096 8192)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="dtypes of hidden and weight (default: fp32 bf16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method (median reported; default 3)")
    parser.add_argument("--chunk_fraction", type=float,
                        help="the fused op's chunk budget (chunk_bytes) as a fraction of the N x V logits, in (0, 1] "
                             "(default: the op's own default)")
    parser.add_argument("--memory-probe", nargs=6, metavar=("METHOD", "N", "H", "V", "DTYPE", "CHUNK_BYTES"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.memory_probe:
        method, N, H, V, dtype_name, chunk_bytes = args.memory_probe
        return memory_probe(method, int(N), int(H), int(V), dtype_name,
                            None if chunk_bytes == "None" else int(chunk_bytes))
    if min(args.n) < 1 or args.repeats < 1:
        parser.error(f"--n and --repeats must be positive integers, got --n {args.n} --repeats {args.repeats}")
    if args.chunk_fraction is not None and not 0 < args.chunk_fraction <= 1:
        parser.error(f"--chunk_fraction must be in (0, 1], got {args.chunk_fraction}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    methods = list(METHODS)
    if args.device.startswith("cuda") and importlib.util.find_spec("liger_kernel") is not None:
        methods.append("liger")

    results = [bench_case(N, H, V, dtype_name, methods, args.device, args.repeats, args.chunk_fraction)
               for H, V in args.shapes for N in args.n for dtype_name in args.dtypes]
    print(f"device={args.device}: {machine(args.device)}; torch={torch.__version__} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (median ms, fwd+bwd to dL/dhidden and dL/dweight; goldfish k=4 h=13, kept "
          f"{100 * min(r['kept_fraction'] for r in results):.1f}-{100 * max(r['kept_fraction'] for r in results):.1f}% "
          f"of the targets; fused chunk budget: "
          f"{'its default' if args.chunk_fraction is None else f'{args.chunk_fraction:g} of the logits'})")
    print(f"targets (issue 15): fused/today <= {MAX_TIME_VS_TODAY}; torch/fused >= {MIN_SPEEDUP_VS_TORCH:.0f}x; fused "
          f"extra peak memory <= {100 * MAX_EXTRA_MEMORY:.0f}% of the logits"
          + ("; fused/liger time <= 1 with less memory" if "liger" in methods else ""))
    header = ["N x H x V:dtype", "logits", *(f"{m} ms" for m in methods), "fused/today", "torch/fused",
              *(f"{m} extra mem" for m in methods if m != "fused"), "fused extra mem (of logits)"]
    if "liger" in methods:
        header.append("fused/liger")
    print_table(header, [table_row(r, methods) for r in results])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
