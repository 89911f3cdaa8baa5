"""The DeepSpeed pretraining pipeline: arguments, optimizer, checkpoints, metrics, export and the job itself."""
from goldfish_ds.training.arguments import build_parser, goldfish_config, parse_args
from goldfish_ds.training.trainer import Job, run

__all__ = ["Job", "build_parser", "goldfish_config", "parse_args", "run"]
