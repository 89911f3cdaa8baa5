"""The paper's extreme-memorization experiment, scaled down: train the same model from the same initialisation for
E epochs on D documents with the standard loss and with each goldfish setting (goldfish-pretrain, DeepSpeed
ZeRO-3), then evaluate them side by side with the untrained control (extraction of each document's last
--suffix_len tokens, membership inference against held-out documents, divergence at dropped tokens, validation
loss on the held-out documents). Writes OUT/report.json ({"runs": {"standard"|"goldfish_k4_h13"|"control":
{"exact_match_rate", "rougeL_mean", "val_loss", ...}}}), OUT/summary.md and plots.

The defaults (32 documents of the built-in corpus, tiny model, 100 epochs) finish in under 15 minutes on 2 CPU
cores.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from goldfish_ds.cli import restart_with_passive_openmp
from goldfish_ds.eval.experiment import ExperimentConfig, run_experiment


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
    p.add_argument("--model_config", default=defaults.model_config, help="Llama config JSON (default: tiny)")
    p.add_argument("--seq_len", type=int, default=defaults.seq_len,
                   help="row length; each document is cut to seq_len + 1 tokens")
    p.add_argument("--suffix_len", type=int, default=defaults.suffix_len, help="extracted suffix length n")
    p.add_argument("--micro_batch", type=int, default=defaults.micro_batch, help="rows per step (divides num_docs)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--min_lr", type=float, default=defaults.min_lr)
    p.add_argument("--warmup_steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--seed", type=int, default=defaults.seed, help="initialisation seed of every run")
    p.add_argument("--beams", type=int, default=None, help="also extract with beam search of this width (the "
                                                            "paper used 30; slow)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    cfg = ExperimentConfig(out=args.out, data=args.data, num_docs=args.num_docs, num_heldout=args.num_heldout,
                           epochs=args.epochs, goldfish=list(args.goldfish), goldfish_strategy=args.goldfish_strategy,
                           model_config=args.model_config, seq_len=args.seq_len, suffix_len=args.suffix_len,
                           micro_batch=args.micro_batch, lr=args.lr, min_lr=args.min_lr,
                           warmup_steps=args.warmup_steps, seed=args.seed, num_beams=args.beams,
                           progress=args.progress)
    report = run_experiment(cfg)
    for name, run in report["runs"].items():
        val = f"  val loss {run['val_loss']:.4f}" if "val_loss" in run else ""
        print(f"{name:>20}: exact match {run['exact_match_rate']:.3f}  RougeL {run['rougeL_mean']:.3f}{val}")
    print(f"report: {args.out}/report.json, {args.out}/summary.md")


if __name__ == "__main__":
    main()
