"""Billion-parameter Llamas on this machine: host memory per phase against DeepSpeed's ZeRO-3 estimate, and tokens/s
against transformers' LlamaForCausalLM under the same DeepSpeed config.

For each model (default: TinyLlama-1.1B, configs/models/tinyllama-1.1b.json, and Llama-3.2-1B,
configs/models/llama-3.2-1b.json, with its 128256-token vocabulary) and layout (`dp2`: ZeRO-3 over 2 data-parallel
ranks, `deepspeed --num_gpus 2`; `tp2`: tensor parallelism over 2 ranks, `mpirun -np 2 ... --tensor_parallel 2`),
configs/deepspeed/zero3_cpu.json with micro-batch 1, --dtype (default fp32; bf16: DeepSpeed's mixed precision,
bf16 weights and gradients, fp32 master weights and AdamW states) and rows of --seq_len tokens (the built-in corpus,
tokenized with a 4096-token sentencepiece model, so its ids fit either vocabulary), it runs:
  1. scripts/pretrain.py from a random initialisation for 3 optimizer steps, then the end-of-run checkpoint and
     the sharded HF export (--hf_max_shard_size): phases init, engine, train, checkpoint, export;
  2. scripts/pretrain.py --resume --max_steps 4: phase resume (the checkpoint read back) and one more step;
  3. scripts/pretrain.py --init_from_hf <the export> for --steps steps: phase import, and the steps timed;
  4. benchmarks/bench_scale_hf_worker.py (dp2 only): LlamaForCausalLM from the same export under the same DeepSpeed
     config, on the same rows and targets: its tokens/s.
Every rank of the job records its peak resident set size per phase (out_dir/memory.jsonl: VmHWM, reset at each
phase's start). Printed next to them (GiB = 2^30 bytes):
  DeepSpeed's estimate  deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs(P, L, dp, 1,
                        cpu_offload=False, zero_init=True) for P = parameters per tensor-parallel shard and L = its
                        largest module's: accelerator memory 4 L + 18 P / dp plus host memory 6 L (4 L x 1.5) per
                        rank; on a CPU rank both are host memory, so the estimate is their sum
  activations           what autograd keeps for one micro-batch: per decoder layer and token 6 h + 4 i + 4
                        (q/k/v/o widths) values, plus the logits slice and the final norm
  whole model           all parameters in --dtype, the size of one full copy of the weights
Bounds (the issue's targets; "held" = the rank's resident set when the phase began; "baseline" = the process
before any model is built: Python, torch, DeepSpeed, which no estimate counts):
  train  peak - baseline <= 1.15 x estimate + activations
  import peak - held <= partition (P / dp weights) + the largest tensor + 1 GiB
  export writer: peak - held <= one shard + one decoder layer or the largest tensor + 1 GiB; others: <= 1 GiB
Tokens/s: median over the steps of run 3 (ours) and run 4 (HF) after the first (warm-up), run one after the other (a
billion-parameter model pair does not fit in 24 GiB at once, so they are not interleaved): ratio >= 0.95.
Model states: fp32 ZeRO-3 costs 16 bytes a parameter (weights, gradients, two AdamW moments) because the pipeline
builds DeepSpeed's optimizer under fp32_master_shares_partition (goldfish_ds/training/zero3_master_weights.py;
DeepSpeed 0.19.8 alone clones the fp32 partition as its master copy: 20 bytes), and so does the HF worker; bf16
mixed precision costs 16 too (2 + 2 + 4 + 8). DeepSpeed's estimate (18 bytes a parameter) is made for mixed
precision and bounds both. On a 24 GiB machine Llama-3.2-1B fits only in bf16 (fp32: 18.4 GiB of states over the 2
ranks plus each rank's gathered fp32 tied embedding and its full gradient); a job that fails is reported and the
other models and layouts still run.
About 8 (tp2) to 25 (dp2, with the HF run) minutes per model on 2 cores; each run's directory (up to 20 GB of
checkpoints) is deleted after its model unless --keep. Usage:
  python benchmarks/bench_scale.py [--models tinyllama-1.1b llama-3.2-1b] [--layouts dp2 tp2] [--seq_len 64]
  python benchmarks/bench_scale.py --estimate configs/train/llama-2-7b_2x8gpu.json --world 16   (formulas only)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from goldfish_ds.models import LlamaConfig  # noqa: E402
from goldfish_ds.models.hf import parse_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "scripts" / "pretrain.py")
HF_WORKER = str(REPO / "benchmarks" / "bench_scale_hf_worker.py")
BIN = Path(sys.executable).parent
GIB = 2**30
SHARD = "1GB"
# glibc serves allocations above this from mmap and returns them to the system when freed. Its default threshold
# moves up to 32 MiB as large blocks are freed, after which the layer-sized temporaries of model construction stay
# in the heap and fragment it (measured at 1.1B: 0.7-1.3 GiB per rank kept after init); fixed, it stays 128 KiB.
MMAP_THRESHOLD = 128 * 1024


# ---- sizes and formulas ---------------------------------------------------------------------------------

def shard_sizes(cfg: LlamaConfig, tp: int) -> dict:
    """Parameter counts of one tensor-parallel shard: all of them (P), its largest module (L, as DeepSpeed's
    model_to_params counts), one decoder layer; and of the whole model (total)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    embeddings = 1 if cfg.tie_word_embeddings else 2

    def counts(tp: int) -> tuple:
        vocab = -(-cfg.vocab_size // tp) * h  # padded to a multiple of tp
        layer = (h * (q + 2 * kv) + q * h + 3 * h * i) // tp + 2 * h
        return embeddings * vocab + cfg.num_hidden_layers * layer + h, vocab, layer

    per_shard, vocab, layer = counts(tp)
    return {"per_shard": per_shard, "largest": max(vocab, h * i // tp, h * q // tp), "layer": layer,
            "total": counts(1)[0]}


def deepspeed_estimate(per_shard: int, largest: int, dp: int) -> int:
    """Bytes per rank DeepSpeed estimates for ZeRO-3 model states (accelerator + host share, see the docstring)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    host, accelerator, _ = estimate_zero3_model_states_mem_needs(per_shard, largest, num_gpus_per_node=dp,
                                                                 num_nodes=1, cpu_offload=False, zero_init=True)
    return accelerator + host // dp


def activation_bytes(cfg: LlamaConfig, tp: int, tokens: int, bytes_per_value: int = 4) -> int:
    """What autograd keeps for `tokens` tokens of one micro-batch without activation checkpointing."""
    h, i = cfg.hidden_size, cfg.intermediate_size // tp
    q, kv = cfg.num_attention_heads * cfg.head_dim // tp, cfg.num_key_value_heads * cfg.head_dim // tp
    per_layer = 6 * h + 4 * i + 2 * q + 2 * kv + q  # norms and residuals, SwiGLU, q/k/v before and after RoPE, attn
    logits = -(-cfg.vocab_size // tp)
    return tokens * (cfg.num_hidden_layers * per_layer + logits + 2 * h) * bytes_per_value


# ---- running the phases ------------------------------------------------------------------------------------

def launcher(layout: str, nproc: int) -> list:
    if layout == "tp2":
        return [str(BIN / "mpirun"), "-np", str(nproc), "--map-by", "slot:OVERSUBSCRIBE", sys.executable, PRETRAIN,
                "--tensor_parallel", str(nproc)]
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), PRETRAIN]


def run(command: list, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    with log.open("w") as f:
        result = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({result.returncode}); see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))


def prepare_data(root: Path, dtype: str) -> dict:
    from goldfish_ds.data import builtin_documents, load_tokenizer, train_sentencepiece, write_packed_shards

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "train" / "manifest.json").is_file():
        docs = builtin_documents()
        tok = load_tokenizer(train_sentencepiece(docs, str(root / "tok"), vocab_size=4096))
        write_packed_shards(map(tok.encode_document, docs[8:]), str(root / "train"), tok.vocab_size)
        write_packed_shards(map(tok.encode_document, docs[:8]), str(root / "val"), tok.vocab_size)
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3_cpu.json").read_text())
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, bf16={"enabled": dtype == "bf16"})
    (root / f"ds_{dtype}.json").write_text(json.dumps(config, indent=1))
    return {"data": str(root / "train"), "val_data": str(root / "val"), "tokenizer": str(root / "tok.model"),
            "deepspeed_config": str(root / f"ds_{dtype}.json"), "bytes_per_value": 2 if dtype == "bf16" else 4}


def job_args(data: dict, model_config: str, out_dir: Path, seq_len: int, *extra: str, log_interval: int = 1) -> list:
    return ["--model_config", model_config, "--out_dir", str(out_dir), "--seq_len", str(seq_len),
            "--data", data["data"], "--val_data", data["val_data"], "--tokenizer", data["tokenizer"],
            "--deepspeed_config", data["deepspeed_config"], "--eval_interval", "0", "--log_interval", str(log_interval),
            "--warmup_steps", "1", "--save_interval", "1000", "--no-progress", "--hf_max_shard_size", SHARD, *extra]


def memory(out_dir: Path) -> dict:
    """{phase: [peak, start] bytes per rank} from the job's memory.jsonl (the last record of each phase and rank)."""
    phases: dict = {}
    for line in (out_dir / "memory.jsonl").read_text().splitlines():
        r = json.loads(line)
        phases.setdefault(r["phase"], {})[r["rank"]] = (r["peak_rss_gib"] * GIB, r["start_rss_gib"] * GIB)
    return {phase: [by_rank[k] for k in sorted(by_rank)] for phase, by_rank in phases.items()}


def tokens_per_s(out_dir: Path) -> list:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records if r["kind"] == "train"]


def bench(model: str, layout: str, data: dict, root: Path, seq_len: int, steps: int, with_hf: bool) -> dict:
    model_config = str(REPO / "configs" / "models" / f"{model}.json")
    cfg = LlamaConfig.from_json(model_config)
    work = root / f"{model}_{layout}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    first, resumed, imported = work / "run", work / "resumed", work / "imported"
    print(f"[{model} {layout}] 1/4 init, 3 steps, checkpoint, export", flush=True)
    run(launcher(layout, 2) + job_args(data, model_config, first, seq_len, "--max_steps", "3"), work / "run.log")
    shutil.copytree(first / "checkpoints", resumed / "checkpoints", copy_function=os.link)  # read only: links
    print(f"[{model} {layout}] 2/4 resume, 1 step", flush=True)
    failed = {}
    try:  # the phases after it do not need it: a failure (e.g. out of memory) is reported, not fatal
        run(launcher(layout, 2) + job_args(data, model_config, resumed, seq_len, "--max_steps", "4", "--resume",
                                           "--no-export_hf"), work / "resumed.log")
    except RuntimeError as e:
        failed["resume"] = str(e).splitlines()[0]
        print(f"[{model} {layout}] {failed['resume']}", flush=True)
    shutil.rmtree(resumed / "checkpoints")
    shutil.rmtree(first / "checkpoints")
    print(f"[{model} {layout}] 3/4 import the export, {steps} steps", flush=True)
    run(launcher(layout, 2) + job_args(data, model_config, imported, seq_len, "--max_steps", str(steps),
                                       "--init_from_hf", str(first / "hf"), "--no-export_hf"),
        work / "imported.log")
    shutil.rmtree(imported / "checkpoints")
    phases = {**memory(first), **{p: v for p, v in memory(resumed).items() if p == "resume"},
              **{p: v for p, v in memory(imported).items() if p == "import"}}
    result = {"model": model, "layout": layout, "phases": phases, "ours_tokens_per_s": tokens_per_s(imported),
              "failed": failed}
    if with_hf:
        print(f"[{model} {layout}] 4/4 transformers LlamaForCausalLM + DeepSpeed, {steps} steps", flush=True)
        command = [str(BIN / "deepspeed"), "--num_gpus", "2", HF_WORKER, "--hf_dir", str(first / "hf"),
                   "--data", data["data"], "--deepspeed_config", data["deepspeed_config"], "--seq_len",
                   str(seq_len), "--steps", str(steps)]
        run(command, work / "hf.log")
        line = next(x for x in (work / "hf.log").read_text().splitlines() if "HF_RESULT " in x)
        hf = json.loads(line.split("HF_RESULT ", 1)[1])
        result["hf_tokens_per_s"] = [hf["tokens_per_step"] / t for t in hf["step_time_s"]]
        result["hf_peak_rss"] = hf["peak_rss_bytes"]
    tp = 2 if layout == "tp2" else 1
    dp = 2 // tp
    sizes = shard_sizes(cfg, tp)
    width = data["bytes_per_value"]
    result.update(sizes=sizes, dp=dp, tp=tp, estimate=deepspeed_estimate(sizes["per_shard"], sizes["largest"], dp),
                  activations=activation_bytes(cfg, tp, seq_len, width), shard_bytes=parse_size(SHARD),
                  bytes_per_value=width)
    return result


# ---- the report ------------------------------------------------------------------------------------------

def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


PHASES = ("init", "engine", "train", "checkpoint", "export", "resume", "import")


def bounds(r: dict) -> dict:
    """{phase: [bound for each rank]} in bytes, of the peak above the process's own baseline (train) or of the
    peak above the memory held when the phase began (the others)."""
    s, dp = r["sizes"], r["dp"]
    width = r["bytes_per_value"]
    partition, largest = width * s["per_shard"] / dp, width * s["largest"]
    layer = width * max(s["layer"], s["largest"])
    return {"train": [1.15 * r["estimate"] + r["activations"]] * 2,
            "import": [partition + largest + GIB] * 2,
            "export": [r["shard_bytes"] + layer + GIB, GIB]}


def report(results: list) -> None:
    rows, checks = [], []
    for r in results:
        limit = bounds(r)
        baseline = [start for _, start in r["phases"]["init"]]  # the process before any model is built
        for phase in (p for p in PHASES if p in r["phases"]):
            for rank, (peak, start) in enumerate(r["phases"][phase]):
                measured = peak - (baseline[rank] if phase == "train" else start)
                bound = limit.get(phase, [None, None])[rank]
                rows.append([r["model"], r["layout"], phase, rank, gib(start), gib(peak), gib(peak - start),
                             gib(bound) if bound else "", ("yes" if measured <= bound else "NO") if bound else ""])
        ours = statistics.median(r["ours_tokens_per_s"][1:])
        hf = statistics.median(r["hf_tokens_per_s"][1:]) if "hf_tokens_per_s" in r else None
        checks.append([r["model"], r["layout"], f"{r['sizes']['total'] / 1e9:.3f}B", gib(r["bytes_per_value"] * r["sizes"]["total"]),
                       gib(r["estimate"]), gib(r["activations"]), f"{ours:.1f}", f"{hf:.1f}" if hf else "",
                       f"{ours / hf:.3f}" if hf else "", ("yes" if ours >= 0.95 * hf else "NO") if hf else ""])
    for r in results:
        for phase, message in r.get("failed", {}).items():
            print(f"{r['model']} {r['layout']}: phase {phase} failed: {message}")
    print("\nhost memory per rank and phase (GiB); bound: of peak - the process's baseline (init's start) for train, "
          "of peak - start otherwise")
    print_table(["model", "layout", "phase", "rank", "start", "peak", "peak - start", "bound", "met"], rows)
    print()
    print_table(["model", "layout", "parameters", "whole model", "DeepSpeed estimate/rank", "activations",
                 "ours tok/s", "HF tok/s", "ours / HF", ">= 0.95"], checks)


def estimate_only(train_config: str, world: int) -> None:
    """Per-GPU model states and activations of a shipped training config on `world` GPUs (same formulas)."""
    import deepspeed  # noqa: F401  (the estimator lives in deepspeed)

    run_cfg = json.loads(Path(train_config).read_text())
    cfg = LlamaConfig.from_json(str(REPO / run_cfg["model_config"]))
    ds = json.loads((REPO / run_cfg["deepspeed_config"]).read_text())
    tp = run_cfg.get("tensor_parallel", 1)
    dp = world // tp
    micro, seq = ds["train_micro_batch_size_per_gpu"], run_cfg["seq_len"]
    sizes = shard_sizes(cfg, tp)
    states = deepspeed_estimate(sizes["per_shard"], sizes["largest"], dp)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    width = 2 if bf16 else 4
    if run_cfg.get("activation_checkpointing"):  # layer inputs kept, one layer recomputed at a time
        h = cfg.hidden_size
        acts = micro * seq * (cfg.num_hidden_layers * h * width) + activation_bytes(
            dataclasses.replace(cfg, num_hidden_layers=1), tp, micro * seq, width)
    else:
        acts = activation_bytes(cfg, tp, micro * seq, width)
    logits = micro * seq * -(-cfg.vocab_size // tp) * width
    print(f"{train_config}: {sizes['total'] / 1e9:.2f}B parameters, TP={tp} x DP={dp}, micro-batch {micro} x "
          f"{seq} tokens, {'bf16' if bf16 else 'fp32'}")
    print(f"  DeepSpeed ZeRO-3 model states per GPU: {gib(states)} GiB; activations {gib(acts)} GiB (logits "
          f"{gib(logits)} GiB of them); total {gib(states + acts)} GiB per GPU")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tinyllama-1.1b", "llama-3.2-1b"],
                   help="names of configs/models/*.json")
    p.add_argument("--layouts", nargs="+", default=["dp2", "tp2"], choices=["dp2", "tp2"])
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps of ours and HF (the first is dropped)")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"], help="precision of the runs (see above)")
    p.add_argument("--out_dir", default=str(REPO / "runs" / "bench_scale"))
    p.add_argument("--keep", action="store_true", help="keep each run's checkpoints and exports")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--estimate", metavar="TRAIN_CONFIG", help="only print the formulas' figures for this config")
    p.add_argument("--world", type=int, default=8, help="GPUs for --estimate")
    args = p.parse_args()
    if args.estimate:
        estimate_only(args.estimate, args.world)
        return
    root = Path(args.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    data = prepare_data(root / "data", args.dtype)
    results, failed = [], []
    for model in args.models:
        for layout in args.layouts:
            try:
                results.append(bench(model, layout, data, root, args.seq_len, args.steps, with_hf=layout == "dp2"))
            except RuntimeError as e:  # e.g. the first job killed for memory: the other models and layouts still run
                failed.append(f"{model} {layout}: {str(e).splitlines()[0]}")
                print(f"[{model} {layout}] {failed[-1]}", flush=True)
            if not args.keep:
                shutil.rmtree(root / f"{model}_{layout}", ignore_errors=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    report(results)
    for message in failed:
        print(f"not measured: {message}")


if __name__ == "__main__":
    main()
