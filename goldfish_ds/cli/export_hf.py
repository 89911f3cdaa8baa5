"""Export a checkpoint of a pretraining run as an HF Llama directory (config.json, safetensors weights, tokenizer).

Launch it like the run that wrote the checkpoint (same launcher, same number of ranks: ZeRO and tensor-parallel
shards are read where they were written), e.g. `python scripts/export_hf.py --out_dir runs/tiny` (installed:
`goldfish-export-hf --out_dir runs/tiny`) or
`mpirun -np 4 python scripts/export_hf.py --out_dir runs/x --tag step_00001000 --hf_dir exports/x-1000`.
The run's options are read from out_dir/args.json; its data directory must still exist. The weights are written
as model.safetensors, or as shards of at most --max_shard_size with model.safetensors.index.json; no rank holds
the whole model. Every rank's peak host memory of the export goes to out_dir/memory.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from goldfish_ds.models.hf import parse_size
from goldfish_ds.training import Job, parse_args
from goldfish_ds.training.export import export_hf
from goldfish_ds.training.trainer import ARGS_FILE


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="the run's --out_dir")
    parser.add_argument("--tag", default=None, help="checkpoint to export, e.g. step_00001000 (default: the latest)")
    parser.add_argument("--hf_dir", default=None, help="where to write the HF directory (default: out_dir/hf-<tag>)")
    parser.add_argument("--max_shard_size", default=None,
                        help="largest safetensors file, e.g. 5GB, 500MB or bytes (default: the run's "
                             "--hf_max_shard_size)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    cli = parser.parse_args(argv)
    if cli.max_shard_size is not None:
        try:
            parse_size(cli.max_shard_size, "--max_shard_size")
        except ValueError as e:
            parser.error(str(e))
    run_args = Path(cli.out_dir) / ARGS_FILE
    if not run_args.is_file():
        sys.exit(f"export_hf.py: error: {run_args} is missing: --out_dir must be a directory written by pretrain.py")
    job = Job(parse_args(["--config", str(run_args), "--out_dir", cli.out_dir]))
    tag = cli.tag or job.checkpoints.latest_tag()
    if tag is None or not (job.checkpoints.root / tag).is_dir():
        sys.exit(f"export_hf.py: error: no checkpoint {tag or '(latest)'} in {job.checkpoints.root}")
    job.checkpoints.load(job.engine, tag)
    hf_dir = cli.hf_dir or str(Path(cli.out_dir) / f"hf-{tag}")
    with job.memory.measure("export"):
        export_hf(job.engine.module, hf_dir, job.tokenizer_path,
                  max_shard_size=cli.max_shard_size or job.args.hf_max_shard_size)
    if dist.get_rank() == 0:
        print(f"exported {job.checkpoints.root / tag} to {hf_dir}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
