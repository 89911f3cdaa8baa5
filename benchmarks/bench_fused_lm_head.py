"""The fused LM head in the pretraining pipeline at the 1B scale: scripts/pretrain.py with --fused_lm_head against
--no-fused_lm_head, per-step time by phase and host memory, one job after the other (a billion-parameter pair does
not fit in 24 GiB at once).

Each job is bench_scale.py's (configs/deepspeed/zero3_cpu.json, micro-batch 1 of --seq_len tokens from the built-in
corpus, 2 ranks in --layout dp2 or tp2, --dtype) from a random initialisation, for --warmup + --steps optimizer
steps, with DeepSpeed's own timers on (wall_clock_breakdown, printed by rank 0 every step): per step the forward,
the backward (with its gradient reduce-scatter) and the optimizer step. Reported: their medians over the last
--steps steps, and the median of their per-step sums (the step time). Only the last step is logged, so one timed
step computes the dropped targets' loss for its record, as a run with a long --log_interval does.
The forward + backward ratio is what the LM head changes; the optimizer step (ZeRO-3's fp32 master update, about a
third of the step here) does not depend on it, and in one job here it took from 11 to 19 s from step to step: so
medians of DeepSpeed's per-phase timers are reported, not a mean of whole steps.
The best a fused head can do: skip 1/k of the LM head's rows, i.e. 1/k of its share of the model FLOPs
(goldfish_ds.training.flops: 6 V H of 6 N + 12 L H Q T per token); it is printed as the step time ratio the job
would reach if the whole step were matmuls.
Memory: each rank's peak resident set of the "train" phase (memory.jsonl) above the process's baseline (the
"init" phase's start), beside the N x V logits of one micro-batch that the unfused head allocates on each rank
(N = --seq_len, V = the vocabulary, or its slice under tp2) in --dtype.
Targets (issue 15): step time fused / unfused <= 0.95; train peak reduced by at least the logits. Usage:
  python benchmarks/bench_fused_lm_head.py [--model llama-3.2-1b] [--layout dp2] [--dtype bf16] [--seq_len 256]
                                           [--warmup 2] [--steps 6] [--json results.json]
About 16 minutes for the pair, Llama-3.2-1B at the defaults on 2 cores; each job's end-of-run checkpoint needs
about 14 GB of free disk, and the runs' directories are deleted after.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import GIB, REPO, job_args, launcher, memory, prepare_data, run  # noqa: E402
from common import print_table  # noqa: E402

from goldfish_ds.models import LlamaConfig  # noqa: E402
from goldfish_ds.training.arguments import build_parser  # noqa: E402
from goldfish_ds.training.flops import training_flops_per_token  # noqa: E402

FLAGS = ("--no-fused_lm_head", "--fused_lm_head")
MAX_STEP_TIME_RATIO = 0.95
# DeepSpeed's per-step line under wall_clock_breakdown (engine.py: "time (ms) | fwd: .. | bwd: .. | ... | step: ..")
TIMERS = re.compile(r"\[Rank 0\] time \(ms\) \| fwd: ([\d.]+) \| bwd: ([\d.]+) \|.*\| step: ([\d.]+)")
PHASES = ("forward", "backward", "optimizer", "total")


def timed_config(data: dict, root: Path) -> dict:
    """data with its DeepSpeed config copied to one that prints DeepSpeed's phase timers at every step."""
    config = json.loads(Path(data["deepspeed_config"]).read_text())
    config.update(wall_clock_breakdown=True, steps_per_print=1)
    path = root / "ds_timed.json"
    path.write_text(json.dumps(config, indent=1))
    return dict(data, deepspeed_config=str(path))


def phase_times(log: Path, warmup: int, steps: int) -> dict:
    """{phase: median seconds} over the steps after `warmup` from rank 0's DeepSpeed timers in the job's log."""
    rows = [tuple(float(x) / 1000 for x in m.groups()) for m in TIMERS.finditer(log.read_text())]
    if len(rows) != warmup + steps:
        raise RuntimeError(f"{log}: {len(rows)} DeepSpeed timer lines, expected {warmup + steps} (one per step)")
    timed = [(f, b, s, f + b + s) for f, b, s in rows[warmup:]]
    return {phase: statistics.median(column) for phase, column in zip(PHASES, zip(*timed))}


def job(flag: str, model_config: str, data: dict, root: Path, layout: str, seq_len: int, warmup: int,
        steps: int) -> dict:
    """One job: its median phase times over the last `steps` steps and each rank's train peak above its baseline."""
    out = root / flag.lstrip("-")
    log = root / f"{flag.lstrip('-')}.log"
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{flag}] {warmup} + {steps} steps", flush=True)
    total = warmup + steps
    run(launcher(layout, 2) + job_args(data, model_config, out, seq_len, "--max_steps", str(total),
                                       "--no-export_hf", flag, log_interval=total), log)
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    phases = memory(out)
    baseline = [start for _, start in phases["init"]]
    result = {**phase_times(log, warmup, steps), "loss": train[-1]["loss"],
              "train_peak_above_baseline": [peak - base for (peak, _), base in zip(phases["train"], baseline)]}
    shutil.rmtree(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", help="a config in configs/models (default: llama-3.2-1b)")
    p.add_argument("--layout", default="dp2", choices=["dp2", "tp2"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                   help="bf16 (default: Llama-3.2-1B fits in 24 GiB only so) or fp32")
    p.add_argument("--seq_len", type=int, default=256,
                   help="tokens per micro-batch (default 256: Llama-3.2-1B bf16 on 2 ranks then takes 22.3 of 23 GiB)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    p.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up (medians; default 6)")
    p.add_argument("--out_dir", default=str(REPO / "runs" / "bench_fused_lm_head"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.seq_len < 1 or args.steps < 1 or args.warmup < 0:
        p.error(f"--seq_len and --steps must be positive and --warmup >= 0, got {args.seq_len}, {args.steps} and "
                f"{args.warmup}")
    model_config = REPO / "configs" / "models" / f"{args.model}.json"
    if not model_config.is_file():
        p.error(f"--model {args.model}: no {model_config}")
    cfg = LlamaConfig.from_json(str(model_config))
    root = Path(args.out_dir)
    data = timed_config(prepare_data(root / "data", args.dtype), root)
    results = {flag: job(flag, str(model_config), data, root, args.layout, args.seq_len, args.warmup, args.steps)
               for flag in FLAGS}
    tp = 2 if args.layout == "tp2" else 1
    logits = args.seq_len * -(-cfg.vocab_size // tp) * data["bytes_per_value"]
    k = build_parser().get_default("goldfish_k")  # the jobs run scripts/pretrain.py's default
    head_share = 6 * cfg.vocab_size * cfg.hidden_size / training_flops_per_token(cfg, args.seq_len)
    plain, fused = (results[flag] for flag in FLAGS)
    ratio = {phase: fused[phase] / plain[phase] for phase in PHASES}
    saved = [a - b for a, b in zip(plain["train_peak_above_baseline"], fused["train_peak_above_baseline"])]
    print(f"\n{args.model} {args.layout} {args.dtype}, micro-batch 1 x {args.seq_len} tokens, medians of {args.steps} "
          f"steps after {args.warmup}; logits per rank {logits / GIB:.3f} GiB")
    print_table(["", "forward s", "backward s", "optimizer s", "step s", "loss",
                 "train peak - baseline, rank 0 / 1 (GiB)"],
                [[flag, *(f"{r[phase]:.2f}" for phase in PHASES), f"{r['loss']:.4f}",
                  " / ".join(f"{x / GIB:.2f}" for x in r["train_peak_above_baseline"])] for flag, r in results.items()]
                + [["fused / unfused", *(f"{ratio[phase]:.3f}" for phase in PHASES), "", ""]])
    print(f"LM head: {100 * head_share:.1f}% of the model FLOPs; skipping 1/{k} of its rows bounds the step time "
          f"ratio at {1 - head_share / k:.3f} if the whole step were matmuls")
    verdict = "met" if ratio["total"] <= MAX_STEP_TIME_RATIO else "MISSED"
    print(f"step time fused / unfused: {ratio['total']:.3f} ({verdict}: <= {MAX_STEP_TIME_RATIO}); forward + backward: "
          f"{(fused['forward'] + fused['backward']) / (plain['forward'] + plain['backward']):.3f}; train peak saved "
          "per rank: " + " / ".join(f"{x / GIB:.3f}" for x in saved)
          + f" GiB ({'met' if min(saved) >= logits else 'MISSED'}: >= the logits, {logits / GIB:.3f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "logits_bytes": logits, **results}, indent=1))


if __name__ == "__main__":
    main()
