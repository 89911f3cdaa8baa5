"""The fused LM head in the pretraining pipeline at the 1B scale: scripts/pretrain.py with --fused_lm_head against
--no-fused_lm_head, step time and host memory, one job after the other (a billion-parameter pair does not fit in
24 GiB at once).

Each job is bench_scale.py's (configs/deepspeed/zero3_cpu.json, micro-batch 1 of --seq_len tokens from the built-in
corpus, 2 ranks in --layout dp2 or tp2, --dtype) from a random initialisation, for 2 x --steps optimizer steps with
--log_interval --steps: the second "train" record's step_time_s is the mean over the last --steps steps, of which
one computes the dropped targets' loss for its record (as a run logging every --steps steps does) and none is the
first step's warm-up. Memory: each rank's peak resident set of the "train" phase (memory.jsonl) above the
process's baseline (the "init" phase's start), beside the N x V logits of one micro-batch that the unfused head
allocates on each rank (N = --seq_len, V = the vocabulary, or its slice under tp2) in --dtype.
Targets (issue 15): step time fused / unfused <= 0.95; train peak reduced by at least the logits. Usage:
  python benchmarks/bench_fused_lm_head.py [--model llama-3.2-1b] [--layout dp2] [--dtype bf16] [--seq_len 256]
                                           [--steps 4] [--json results.json]
About 18 minutes for the pair, Llama-3.2-1B at the defaults on 2 cores; the runs' directories are deleted after.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import GIB, REPO, job_args, launcher, memory, prepare_data, run  # noqa: E402
from common import print_table  # noqa: E402

from goldfish_ds.models import LlamaConfig  # noqa: E402

FLAGS = ("--no-fused_lm_head", "--fused_lm_head")
MAX_STEP_TIME_RATIO = 0.95


def job(flag: str, model_config: str, data: dict, root: Path, layout: str, seq_len: int, steps: int) -> dict:
    """One job: the mean step time of its last `steps` steps and each rank's train peak above its baseline."""
    out = root / flag.lstrip("-")
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{flag}] {2 * steps} steps", flush=True)
    run(launcher(layout, 2) + job_args(data, model_config, out, seq_len, "--max_steps", str(2 * steps),
                                       "--no-export_hf", flag, log_interval=steps),
        root / f"{flag.lstrip('-')}.log")
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    phases = memory(out)
    baseline = [start for _, start in phases["init"]]
    result = {"step_time_s": train[-1]["step_time_s"], "loss": train[-1]["loss"],
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
                   help="tokens per micro-batch (default 256: Llama-3.2-1B bf16 on 2 ranks then takes 21.6 of 23 GiB)")
    p.add_argument("--steps", type=int, default=4, help="timed steps after as many warm-up steps (default 4)")
    p.add_argument("--out_dir", default=str(REPO / "runs" / "bench_fused_lm_head"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.seq_len < 1 or args.steps < 1:
        p.error(f"--seq_len and --steps must be positive, got {args.seq_len} and {args.steps}")
    model_config = REPO / "configs" / "models" / f"{args.model}.json"
    if not model_config.is_file():
        p.error(f"--model {args.model}: no {model_config}")
    cfg = LlamaConfig.from_json(str(model_config))
    root = Path(args.out_dir)
    data = prepare_data(root / "data", args.dtype)
    results = {flag: job(flag, str(model_config), data, root, args.layout, args.seq_len, args.steps) for flag in FLAGS}
    tp = 2 if args.layout == "tp2" else 1
    logits = args.seq_len * -(-cfg.vocab_size // tp) * data["bytes_per_value"]
    plain, fused = (results[flag] for flag in FLAGS)
    ratio = fused["step_time_s"] / plain["step_time_s"]
    saved = [a - b for a, b in zip(plain["train_peak_above_baseline"], fused["train_peak_above_baseline"])]
    print(f"\n{args.model} {args.layout} {args.dtype}, micro-batch 1 x {args.seq_len} tokens, mean of {args.steps} "
          f"steps after {args.steps}; logits per rank {logits / GIB:.3f} GiB")
    print_table(["", "step time s", "loss", "train peak - baseline, rank 0 / 1 (GiB)"],
                [[flag, f"{r['step_time_s']:.2f}", f"{r['loss']:.4f}",
                  " / ".join(f"{x / GIB:.2f}" for x in r["train_peak_above_baseline"])] for flag, r in results.items()])
    print(f"step time fused / unfused: {ratio:.3f} ({'met' if ratio <= MAX_STEP_TIME_RATIO else 'MISSED'}: "
          f"<= {MAX_STEP_TIME_RATIO}); train peak saved per rank: " + " / ".join(f"{x / GIB:.3f}" for x in saved)
          + f" GiB ({'met' if min(saved) >= logits else 'MISSED'}: >= the logits, {logits / GIB:.3f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "logits_bytes": logits, **results}, indent=1))


if __name__ == "__main__":
    main()
