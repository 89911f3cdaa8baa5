"""The paper's extreme-memorization experiment: train the same model from the same start for E epochs on D
documents with the standard loss and with each goldfish setting (goldfish-pretrain, DeepSpeed ZeRO-3, under the
chosen launcher), then evaluate them side by side with the control, the start itself (extraction of each
document's last --suffix_len tokens, greedy and with --beams, membership inference against held-out documents,
divergence at dropped tokens, validation loss on the held-out documents). Writes OUT/report.json ({"runs":
{"standard"|"goldfish_k4_h13"|"control": {"exact_match_rate", "rougeL_mean", "val_loss", ...}}}), OUT/summary.md
and plots (memorization_vs_k.png: exact match and RougeL against k).

The start is a random initialisation of --model_config with a tokenizer trained on the documents, or, with
--init_from_hf DIR, a pretrained HF Llama (its config, weights and tokenizer, or --tokenizer); the control is
then DIR itself. The defaults (32 documents of the built-in corpus, tiny model, 100 epochs, one process) finish in
under 15 minutes on 2 CPU cores. The paper's setting (Llama-2-7B, 100 Wikipedia articles, 100 epochs, k = 3, 4,
8, 32, 128 at h = 13, 30 beams) on 8 GPUs:

  goldfish-memorization-experiment --init_from_hf Llama-2-7b-hf --data wiki.jsonl \\
      --num_docs 100 --num_heldout 100 --seq_len 2048 --epochs 100 --launcher deepspeed --nproc_per_node 8 \\
      --tensor_parallel 2 --micro_batch 1 --lr 2e-5 --min_lr 2e-6 --goldfish 3,13 4,13 8,13 32,13 128,13 \\
      --beams 30 --pretrain_args "--activation_checkpointing" --out exp7b
"""
from __future__ import annotations

import argparse
import shlex
from typing import List, Optional

from goldfish_ds.cli import restart_with_passive_openmp
from goldfish_ds.eval.experiment import LAUNCHERS, ExperimentConfig, run_experiment


def goldfish_setting(text: str) -> tuple:
    try:
        k, h = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K,H (e.g. 4,13), got {text!r}") from None
    return k, h


def main(argv: Optional[List[str]] = None) -> None:
    if argv is None:  # idle OpenMP threads must not spin during generation
        restart_with_passive_openmp(__spec__.name)
    defaults = ExperimentConfig(out="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="JSONL of {'text': ...} documents (default: Python's bundled "
                                                "documentation topics); the first --num_docs are trained on, the "
                                                "next --num_heldout are held out")
    p.add_argument("--num_docs", type=int, default=defaults.num_docs, help="documents trained on (D)")
    p.add_argument("--num_heldout", type=int, default=defaults.num_heldout,
                   help="held-out documents (validation loss, membership-inference non-members)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs over the documents (E)")
    p.add_argument("--goldfish", type=goldfish_setting, nargs="+", default=defaults.goldfish, metavar="K,H",
                   help="goldfish settings, one run each (default 4,13)")
    p.add_argument("--goldfish_strategy", default=defaults.goldfish_strategy)
    start = p.add_argument_group("the start (the control)")
    start.add_argument("--model_config", default=None, help="Llama config JSON of a random start (default: tiny)")
    start.add_argument("--init_from_hf", default=None, metavar="DIR",
                       help="start every run from this HF Llama directory (its config.json, weights and tokenizer); "
                            "the control is DIR itself")
    start.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF tokenizer directory (default: "
                                                         "DIR's own with --init_from_hf, else one trained on --data)")
    launch = p.add_argument_group("launching the training runs")
    launch.add_argument("--launcher", default=defaults.launcher, choices=LAUNCHERS,
                        help="none: one process; deepspeed / torchrun / mpirun start --nproc_per_node ranks")
    launch.add_argument("--nproc_per_node", type=int, default=defaults.nproc_per_node,
                        help="ranks (GPUs, or CPU processes without one)")
    launch.add_argument("--tensor_parallel", type=int, default=defaults.tensor_parallel,
                        help="tensor-parallel size (divides --nproc_per_node)")
    launch.add_argument("--deepspeed_config", default=None,
                        help="DeepSpeed JSON config of every run (default: the package's zero3_gpu_bf16.json with "
                             "CUDA, zero3_cpu.json without; with --micro_batch 8 and no accumulation)")
    launch.add_argument("--pretrain_args", default="", metavar='"..."',
                        help="further goldfish-pretrain options for every run, e.g. \"--activation_checkpointing "
                             "--goldfish_window preceding\" (not those the experiment sets: data, steps, lr, ...)")
    p.add_argument("--seq_len", type=int, default=defaults.seq_len,
                   help="row length; each document is cut to seq_len + 1 tokens")
    p.add_argument("--suffix_len", type=int, default=defaults.suffix_len, help="extracted suffix length n")
    p.add_argument("--micro_batch", type=int, default=None,
                   help="rows per rank and micro-step (default: 8, or --deepspeed_config's); the global batch "
                        "(micro x accumulation x data-parallel ranks) must divide --num_docs")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--min_lr", type=float, default=defaults.min_lr)
    p.add_argument("--warmup_steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--seed", type=int, default=defaults.seed, help="initialisation seed of every run")
    p.add_argument("--beams", type=int, default=None, help="also extract with beam search of this width (the "
                                                            "paper's adversarial extraction used 30; slow)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    try:
        cfg = ExperimentConfig(
            out=args.out, data=args.data, num_docs=args.num_docs, num_heldout=args.num_heldout, epochs=args.epochs,
            goldfish=list(args.goldfish), goldfish_strategy=args.goldfish_strategy, model_config=args.model_config,
            init_from_hf=args.init_from_hf, tokenizer=args.tokenizer, launcher=args.launcher,
            nproc_per_node=args.nproc_per_node, tensor_parallel=args.tensor_parallel,
            deepspeed_config=args.deepspeed_config, pretrain_args=shlex.split(args.pretrain_args),
            seq_len=args.seq_len, suffix_len=args.suffix_len, micro_batch=args.micro_batch, lr=args.lr,
            min_lr=args.min_lr, warmup_steps=args.warmup_steps, seed=args.seed, num_beams=args.beams,
            progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    report = run_experiment(cfg)
    for name, run in report["runs"].items():
        beam = (f"  ({run['beam']['num_beams']} beams: exact match {run['beam']['exact_match_rate']:.3f}  RougeL "
                f"{run['beam']['rougeL_mean']:.3f})") if "beam" in run else ""
        print(f"{name:>20}: exact match {run['exact_match_rate']:.3f}  RougeL {run['rougeL_mean']:.3f}{beam}  "
              f"val loss {run['val_loss']:.4f}")
    print(f"report: {args.out}/report.json, {args.out}/summary.md")


if __name__ == "__main__":
    main()
