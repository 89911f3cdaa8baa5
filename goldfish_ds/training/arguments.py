"""Command line of the pretraining job, and the JSON run configs that fill it.

Every option can be given on the command line or in a `--config` JSON file whose keys are the option
names without dashes (the command line wins). Batch sizes, precision and ZeRO settings live in the
DeepSpeed config (`--deepspeed_config`).
"""
from __future__ import annotations

import argparse
import json
import os
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from goldfish_ds.config import STRATEGIES, WINDOWS, GoldfishConfig
from goldfish_ds.models.hf import DEFAULT_MAX_SHARD_SIZE, parse_size
from goldfish_ds.table import load_table
from goldfish_ds.training.flops import FORMULA, PEAK_TFLOPS
from goldfish_ds.training.loss_normalization import LOSS_NORMALIZATIONS
from goldfish_ds.training.preemption import PREEMPTED_EXIT_STATUS

if TYPE_CHECKING:
    from goldfish_ds.data.tokenizer import Tokenizer

# The shipped configs are package data (the repository's configs/ is a link to this directory).
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_MODEL_CONFIG = str(PACKAGE_CONFIGS / "models" / "tiny.json")
DEFAULT_CPU_DEEPSPEED_CONFIG = str(PACKAGE_CONFIGS / "deepspeed" / "zero3_cpu.json")
DEFAULT_GPU_DEEPSPEED_CONFIG = str(PACKAGE_CONFIGS / "deepspeed" / "zero3_gpu_bf16.json")
GOLDFISH_BOUNDARIES = ("none", "reset")  # --goldfish_boundaries
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # wandb's own values of WANDB_MODE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain or continue-pretraining a Llama with the goldfish loss on DeepSpeed (ZeRO 1-3) with "
                    "tensor parallelism. Launch with `deepspeed`, `torchrun`, `mpirun` or plain `python`. With no "
                    "data arguments it trains the tiny model on Python's bundled documentation (pydoc_data.topics) "
                    "with a tokenizer trained on the spot.",
        epilog=f"Exit status: 0 when --max_steps were trained; {PREEMPTED_EXIT_STATUS} when SIGTERM or SIGUSR1 (to any "
               "rank or a launcher that forwards it) or --exit_after_minutes stopped the job after a checkpoint of "
               "its last step (run it again with --resume); anything else is an error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file of option values (keys = option names without dashes); the "
                                    "command line overrides it")
    run = p.add_argument_group("run")
    run.add_argument("--deepspeed_config", default=None,
                     help="DeepSpeed JSON config (batch sizes, ZeRO stage, bf16, gradient_clipping; bucket and "
                          "prefetch sizes given as \"auto\" are fitted to the model); default "
                          "configs/deepspeed/zero3_cpu.json without a GPU, zero3_gpu_bf16.json with one")
    run.add_argument("--out_dir", default="runs/default", help="checkpoints/, metrics.jsonl, tensorboard/, hf/")
    run.add_argument("--max_steps", type=int, default=300, help="optimizer steps to train for (in total, "
                                                                 "counting the steps before a resume)")
    run.add_argument("--resume", action="store_true",
                     help="continue exactly from the newest valid checkpoint in out_dir/checkpoints (every file of "
                          "its manifest present with its size; a damaged one is skipped with a message)")
    run.add_argument("--resume_from", default=None, metavar="TAG",
                     help="continue exactly from this checkpoint, e.g. step_00000100 (implies --resume)")
    run.add_argument("--verify_checkpoint", action="store_true",
                     help="with --resume or --resume_from: check the sha256 of every checkpoint file against its "
                          "manifest too (reads the whole checkpoint, split between the ranks)")
    run.add_argument("--reshard", action="store_true",
                     help="with --resume: continue a ZeRO-3 checkpoint at another data-parallel size (the same "
                          "--tensor_parallel, --seq_len and global batch: micro-batch x accumulation x data-parallel "
                          "size), converting its weights and optimizer state on loading")
    faults = p.add_argument_group("preemption and bad steps (see the README's Preemption and faults section)")
    faults.add_argument("--exit_after_minutes", type=float, default=None,
                        help="stop after this many minutes of wall-clock time (rank 0's clock, from the start of "
                             "set-up) as on SIGTERM/SIGUSR1: finish the step, write a checkpoint, exit with status "
                             f"{PREEMPTED_EXIT_STATUS}")
    faults.add_argument("--max_skipped_steps", type=int, default=3,
                        help="stop with an error when this many optimizer steps in a row were skipped for a "
                             "non-finite loss or gradient norm")
    faults.add_argument("--spike_factor", type=float, default=2.0,
                        help="log a 'spike' record when a step's loss exceeds this factor times its running mean "
                             "(an EMA with decay 0.9) after --warmup_steps applied steps; 0: never")
    run.add_argument("--seed", type=int, default=1234, help="model initialisation seed")
    run.add_argument("--data_seed", type=int, default=0, help="seed of the per-epoch row order")
    run.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher

    net = p.add_argument_group("several hosts (see the README's Multi-node section)")
    net.add_argument("--master_addr", default=None,
                     help="rank 0's address, reachable from every host (default: MASTER_ADDR, or the launcher's: "
                          "torchrun/deepspeed's, Slurm's first node; under MPI rank 0 picks its own)")
    net.add_argument("--master_port", type=int, default=None,
                     help="rank 0's rendezvous port (default: MASTER_PORT, or the launcher's; under MPI a free one)")
    net.add_argument("--network_interface", default=None,
                     help="interface for the ranks' traffic, e.g. eth0 or ib0: sets GLOO_SOCKET_IFNAME and "
                          "NCCL_SOCKET_IFNAME (default: gloo uses the interface that reaches rank 0)")
    net.add_argument("--dist_timeout", type=float, default=600.0,
                     help="seconds a collective may wait: a lost rank or host stops the others with an error "
                          "after this long")

    model = p.add_argument_group("model")
    model.add_argument("--model_config", default=DEFAULT_MODEL_CONFIG,
                       help="Llama config JSON (ours or an HF config.json)")
    model.add_argument("--init_from_hf", default=None,
                       help="continue pretraining from this HF Llama directory (its config.json replaces "
                            "--model_config)")
    model.add_argument("--tensor_parallel", type=int, default=1, help="tensor-parallel size (divides the world)")
    model.add_argument("--activation_checkpointing", action="store_true", help="recompute decoder layers in the "
                                                                               "backward pass")
    model.add_argument("--fused_lm_head", action=argparse.BooleanOptionalAction, default=False,
                       help="training steps compute the goldfish loss inside the LM head "
                            "(vocab_parallel_goldfish_linear_cross_entropy): only the kept targets' rows enter "
                            "the LM-head matmuls, in chunks, so no [micro-batch x seq_len, vocab] logits buffer is "
                            "allocated (validation keeps the logits path). The loss equals --no-fused_lm_head's up "
                            "to float rounding")
    model.add_argument("--document_attention", action="store_true",
                       help="attention within each packed document only (a new one starts after each EOS input "
                            "token; RoPE positions restart at 0 there), in training and validation; needs a "
                            "tokenizer with EOS. Costs a [micro-batch, 1, seq_len, seq_len] bool mask per forward "
                            "and, on CUDA, the memory-efficient attention kernel instead of flash")

    data = p.add_argument_group("data")
    data.add_argument("--data", default=None, help="packed training data directory (scripts/prepare_data.py); "
                                                   "default: the built-in corpus, prepared in out_dir/data")
    data.add_argument("--val_data", default=None, help="packed validation data directory (default: none, or the "
                                                       "built-in corpus's held-out documents)")
    data.add_argument("--tokenizer", default=None, help="the tokenizer of --data (sentencepiece .model or HF "
                                                        "directory); copied into the HF export")
    data.add_argument("--seq_len", type=int, default=256, help="tokens per training row")
    data.add_argument("--verify_data", action="store_true", help="check every shard's sha256 before training")

    gf = p.add_argument_group("goldfish loss")
    gf.add_argument("--goldfish", action=argparse.BooleanOptionalAction, default=True,
                    help="use the goldfish loss (--no-goldfish: the standard loss, through the same kernels)")
    gf.add_argument("--goldfish_k", type=int, default=4, help="drop about 1/k of the targets (k >= 2)")
    gf.add_argument("--goldfish_h", type=int, default=13, help="context width of the hashed strategies")
    gf.add_argument("--goldfish_strategy", default="hash-table", choices=sorted(STRATEGIES))
    gf.add_argument("--goldfish_window", default="inclusive", choices=WINDOWS,
                    help="inclusive: target + h-1 predecessors (official code); preceding: the h tokens before")
    gf.add_argument("--goldfish_start_position", type=int, default=0, help="first dropped position (static)")
    gf.add_argument("--goldfish_exempt_ids", default="special",
                    help="comma-separated ids never dropped; 'special' = the tokenizer's BOS/EOS/PAD; 'none'")
    gf.add_argument("--goldfish_table_path", default=None, help="hash-table values file (default: the official "
                                                                "table, drawn on the CPU)")
    gf.add_argument("--goldfish_seed", type=int, default=0, help="seed of the random strategy")
    gf.add_argument("--goldfish_boundaries", default="none", choices=GOLDFISH_BOUNDARIES,
                    help="none: each row is one sequence (the official behaviour; hash windows span the documents "
                         "packed into a row); reset: cut rows after every EOS label (the tokenizer's EOS id) and mask "
                         "each document as a row of its own")

    opt = p.add_argument_group("optimizer (AdamW, linear warmup then cosine decay; clipping from the DeepSpeed "
                               "config's gradient_clipping)")
    opt.add_argument("--lr", type=float, default=4e-4)
    opt.add_argument("--min_lr", type=float, default=4e-5)
    opt.add_argument("--warmup_steps", type=int, default=20)
    opt.add_argument("--beta1", type=float, default=0.9)
    opt.add_argument("--beta2", type=float, default=0.95)
    opt.add_argument("--weight_decay", type=float, default=0.1, help="applied to matrices, not to norms")
    opt.add_argument("--loss_normalization", default="micro_batch", choices=LOSS_NORMALIZATIONS,
                     help="micro_batch: each micro-batch's loss is the mean over its kept targets (the official "
                          "definition; DeepSpeed then averages the micro-batches and ranks); global_tokens: the sum "
                          "of the kept-target losses of the whole global batch (every accumulation micro-batch of "
                          "every data-parallel rank) over their count, so every kept target weighs the same (one "
                          "more all-reduce per step). Use global_tokens when kept counts vary between "
                          "micro-batches: SFT data (unsupervised prompts), goldfish drops, padded rows")

    log = p.add_argument_group("logging, validation and checkpoints")
    log.add_argument("--log_interval", type=int, default=1,
                     help="steps between \"train\" records, and the last step (the dropped targets' loss is only "
                          "computed on these: under --fused_lm_head it costs an LM-head matmul)")
    log.add_argument("--eval_interval", type=int, default=50, help="steps between validation losses (0: never)")
    log.add_argument("--eval_rows", type=int, default=256,
                     help="validation rows per validation pass: the first N of --val_data (all of them if it has "
                          "fewer), split across the data-parallel ranks; the same rows, and the same loss, for any "
                          "number of ranks, tensor parallelism and batch sizes")
    log.add_argument("--memorization_eval_interval", type=int, default=0, metavar="N",
                     help="every N steps (and at the last step) extract each document of --memorization_data with "
                          "the protocol of goldfish-evaluate-memorization: prompt with all but its last "
                          "--memorization_suffix_len tokens, decode that many greedily with the job's model (ZeRO-3 "
                          "and TP as trained), and log a 'memorization' record (exact_match_rate, token_match_mean, "
                          "longest_run_mean, rougeL_mean, num_docs, seconds; per document in "
                          "out_dir/memorization/step_N.jsonl). No KV cache: an evaluation runs "
                          "--memorization_suffix_len forward passes of each of its ceil(docs / data-parallel ranks / "
                          "micro-batch) batches per rank, each about a third of a training micro-batch's forward + "
                          "backward; minutes per evaluation for a 7B model. 0: never")
    log.add_argument("--memorization_data", default=None, metavar="JSONL",
                     help="documents for --memorization_eval_interval: a canary.jsonl of goldfish-prepare-data "
                          "--canary (per document its text and exact ids) or a JSONL of records with \"text\" "
                          "(tokenized as BOS + text); default: the canary.jsonl of --data")
    log.add_argument("--memorization_suffix_len", type=int, default=50, metavar="n",
                     help="tokens decoded and compared per document (the evaluation's n, 50 in the paper)")
    log.add_argument("--save_interval", type=int, default=100, help="steps between checkpoints (and at the end)")
    log.add_argument("--keep_checkpoints", type=int, default=2, help="complete checkpoints kept on disk")
    log.add_argument("--export_hf", action=argparse.BooleanOptionalAction, default=True,
                     help="write an HF-format model and the tokenizer to out_dir/hf at the end")
    log.add_argument("--hf_max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                     help="largest safetensors file of the HF export (e.g. 5GB, 500MB, or bytes); a model that fits "
                          "in one is written as model.safetensors, a larger one as shards with an index")
    log.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="progress bar on rank 0")
    log.add_argument("--wandb_project", default=None,
                     help="also log to Weights & Biases, in this project (rank 0; the run's files under "
                          "out_dir/wandb). WANDB_MODE=offline logs without a network (`wandb sync` uploads later); "
                          "needs the wandb package")
    log.add_argument("--wandb_run_name", default=None, help="W&B run name (default: the name of --out_dir)")
    log.add_argument("--peak_tflops", type=float, default=None,
                     help="peak TFLOP/s of one device, for the model FLOPs utilisation (mfu) logged per step beside "
                          f"model_flops and tflops_per_s; {FORMULA}. Default: the bf16/fp16 dense peak of a listed "
                          f"GPU ({', '.join(f'{k} {v:g}' for k, v in PEAK_TFLOPS.items())}) when training in "
                          "bf16/fp16, else none and mfu is not logged (CPUs, fp32)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line over the defaults and the optional --config file; validate what can be."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        values = json.loads(Path(args.config).read_text())
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {args.config}: unknown options {unknown}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    for name in ("max_steps", "seq_len", "tensor_parallel", "log_interval", "eval_rows", "save_interval",
                 "keep_checkpoints", "max_skipped_steps", "memorization_suffix_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_interval", "memorization_eval_interval"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.memorization_eval_interval and find_spec("rouge_score") is None:
        raise ValueError("--memorization_eval_interval scores RougeL with the rouge-score package: pip install "
                         "rouge-score (or goldfish_ds[eval])")
    if args.memorization_data is not None and not args.memorization_eval_interval:
        raise ValueError("--memorization_data is read only by the evaluation of --memorization_eval_interval N: give "
                         "N >= 1 too")
    if args.reshard and not (args.resume or args.resume_from):
        raise ValueError("--reshard converts the checkpoint that --resume loads: give --resume too")
    if args.verify_checkpoint and not (args.resume or args.resume_from):
        raise ValueError("--verify_checkpoint checks the checkpoint a run resumes from: give --resume or "
                         "--resume_from TAG too")
    if not args.dist_timeout > 0:
        raise ValueError(f"--dist_timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.exit_after_minutes is not None and not args.exit_after_minutes > 0:
        raise ValueError(f"--exit_after_minutes must be > 0 minutes, got {args.exit_after_minutes}")
    if not (args.spike_factor == 0 or args.spike_factor > 1):
        raise ValueError(f"--spike_factor must be 0 (off) or > 1, got {args.spike_factor}")
    if args.loss_normalization not in LOSS_NORMALIZATIONS:  # argparse does not check a --config value
        raise ValueError(f"--loss_normalization must be one of {list(LOSS_NORMALIZATIONS)}, got "
                         f"{args.loss_normalization!r}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min_lr must be in [0, --lr={args.lr}], got {args.min_lr}")
    parse_size(args.hf_max_shard_size, "--hf_max_shard_size")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak_tflops must be > 0 (TFLOP/s of one device), got {args.peak_tflops}")
    if args.wandb_project is not None:
        if find_spec("wandb") is None:
            raise ValueError("--wandb_project needs the wandb package: pip install wandb")
        mode = os.environ.get("WANDB_MODE")
        if mode is not None and mode not in WANDB_MODES:
            raise ValueError(f"--wandb_project: WANDB_MODE must be one of {list(WANDB_MODES)}, got {mode!r}")
    elif args.wandb_run_name is not None:
        raise ValueError("--wandb_run_name names a W&B run: give --wandb_project too")
    if args.goldfish:
        goldfish_config(args, special_ids=())  # k, h, window... checked before anything starts
        if args.goldfish_table_path:
            load_table(args.goldfish_table_path)  # read at the first step otherwise, after the model is built
    return args


def parse_exempt_ids(spec: str, special_ids: tuple) -> tuple:
    """--goldfish_exempt_ids: 'special' (the given special_ids), 'none', or comma-separated integers."""
    spec = str(spec).strip()
    if spec == "special":
        return tuple(sorted(set(special_ids)))
    if spec in ("none", ""):
        return ()
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--goldfish_exempt_ids must be 'special', 'none' or comma-separated integers, "
                         f"got {spec!r}") from None


def required_eos_id(tokenizer: Tokenizer | None, option: str, use: str, alternative: str = "") -> int:
    """The EOS id of `tokenizer` (None when the run has none) for `option`, which `use`s it; a ValueError naming
    the option (and `alternative`, another way out) when there is no EOS id."""
    if tokenizer is None:
        raise ValueError(f"{option} {use}: give the data's --tokenizer, as this run has no tokenizer{alternative}")
    if tokenizer.eos_id is None:
        raise ValueError(f"{option} {use}, but tokenizer {tokenizer.path} has no EOS token: give a --tokenizer "
                         f"with an EOS token{alternative}")
    return tokenizer.eos_id


def goldfish_boundary_id(args: argparse.Namespace, tokenizer: Tokenizer | None) -> int | None:
    """--goldfish_boundaries: None for 'none'; for 'reset' the EOS id of `tokenizer` (a Tokenizer, or None when
    the run has none), with an error naming the option when there is no EOS id to cut at."""
    if args.goldfish_boundaries == "none":
        return None
    return required_eos_id(tokenizer, "--goldfish_boundaries reset", "cuts rows at the tokenizer's EOS id",
                           ", or --goldfish_boundaries none")


def goldfish_config(args: argparse.Namespace, special_ids: tuple, boundary_id: int | None = None
                    ) -> GoldfishConfig | None:
    """The GoldfishConfig the options describe (None for --no-goldfish); special_ids fill 'special', boundary_id
    (goldfish_boundary_id) the document boundaries."""
    if not args.goldfish:
        return None
    exempt = parse_exempt_ids(args.goldfish_exempt_ids, special_ids)
    return GoldfishConfig(k=args.goldfish_k, h=args.goldfish_h, strategy=args.goldfish_strategy,
                          window=args.goldfish_window, start_position=args.goldfish_start_position,
                          exempt_ids=exempt, table_path=args.goldfish_table_path, seed=args.goldfish_seed,
                          boundary_id=boundary_id)
