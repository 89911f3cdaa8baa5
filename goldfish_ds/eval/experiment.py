"""The paper's "extreme memorization" experiment, scaled down, on our own pipeline.

The same model, from the same initialisation, is trained for E epochs on D documents (each at the start of
its own padded row, the paper's canary setup) once with the standard loss and once per goldfish setting,
by the pretraining job (goldfish-pretrain, DeepSpeed ZeRO-3); the untrained initialisation is the control.
All of them are then evaluated side by side with evaluate_models (extraction of the documents' suffixes,
membership inference against held-out documents, divergence at dropped tokens) and the validation loss on
the held-out documents is reported next to it.

Layout of `out`: tokenizer.model, data/{train,val}/ (packed), heldout.jsonl, runs/<name>/ (each training
run's out_dir, its HF export in runs/<name>/hf), control/ (HF export of the initialisation), and the
report: report.json ({"config": ..., "runs": {name: {...}}}), summary.md and the plots.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.data import (CanarySet, builtin_documents, load_tokenizer, read_documents, train_sentencepiece,
                              write_packed_shards)
from goldfish_ds.eval.compare import evaluate_models
from goldfish_ds.eval.report import write_report
from goldfish_ds.models import Llama, LlamaConfig, save_hf_llama
from goldfish_ds.training.arguments import DEFAULT_MODEL_CONFIG, PACKAGE_CONFIGS
from goldfish_ds.training.export import copy_tokenizer

PRETRAIN_COMMAND = [sys.executable, "-m", "goldfish_ds.cli.pretrain"]  # goldfish-pretrain, scripts/pretrain.py


@dataclass
class ExperimentConfig:
    """What to train and evaluate. goldfish: (k, h) settings, one goldfish run each."""

    out: str
    data: str | None = None  # JSONL with "text"; None: Python's bundled documentation topics
    num_docs: int = 32
    num_heldout: int = 32
    epochs: int = 100
    goldfish: list[tuple[int, int]] = field(default_factory=lambda: [(4, 13)])
    goldfish_strategy: str = "hash-table"
    model_config: str = DEFAULT_MODEL_CONFIG
    seq_len: int = 256
    suffix_len: int = 50
    micro_batch: int = 8
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    seed: int = 1234
    num_beams: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("num_docs", "epochs", "seq_len", "suffix_len", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExperimentConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.suffix_len >= self.seq_len:
            raise ValueError(f"ExperimentConfig: suffix_len ({self.suffix_len}) must be < seq_len ({self.seq_len})")
        if self.num_docs % self.micro_batch:
            raise ValueError(f"ExperimentConfig: num_docs ({self.num_docs}) must be a multiple of the micro-batch "
                             f"({self.micro_batch}) so every epoch sees every document")
        for k, h in self.goldfish:
            GoldfishConfig(k=k, h=h, strategy=self.goldfish_strategy)  # validated before anything runs

    @property
    def steps(self) -> int:
        return self.epochs * self.num_docs // self.micro_batch


def _documents(cfg: ExperimentConfig) -> list[str]:
    texts = list(read_documents([cfg.data])) if cfg.data else builtin_documents()
    if len(texts) < cfg.num_docs + 1:
        raise ValueError(f"{cfg.data or 'the built-in corpus'} has {len(texts)} documents; the experiment needs "
                         f"num_docs ({cfg.num_docs}) plus at least one held-out document")
    return texts


def prepare(cfg: ExperimentConfig) -> tuple[Path, list[dict]]:
    """Tokenizer (trained on all the documents), canary training data, held-out validation data.

    Returns the tokenizer path and the held-out records."""
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    texts = _documents(cfg)
    members, heldout = texts[:cfg.num_docs], texts[cfg.num_docs:cfg.num_docs + cfg.num_heldout]
    model = LlamaConfig.from_json(cfg.model_config)
    tok_path = train_sentencepiece(texts, str(root / "tokenizer"), vocab_size=model.vocab_size)
    tok = load_tokenizer(tok_path)
    canary = CanarySet(members, [tok.encode_document(t) for t in members], seq_len=cfg.seq_len)
    write_packed_shards([], str(root / "data" / "train"), tok.vocab_size, canary=canary)
    write_packed_shards((tok.encode_document(t) for t in heldout), str(root / "data" / "val"), tok.vocab_size)
    records = [{"text": t} for t in heldout]
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return Path(tok_path), records


def _deepspeed_config(cfg: ExperimentConfig, path: Path) -> str:
    config = json.loads((PACKAGE_CONFIGS / "deepspeed" / "zero3_cpu.json").read_text())
    config.update(train_micro_batch_size_per_gpu=cfg.micro_batch, gradient_accumulation_steps=1)
    path.write_text(json.dumps(config, indent=1))
    return str(path)


def train_run(cfg: ExperimentConfig, name: str, goldfish: tuple[int, int] | None, tokenizer: Path) -> Path:
    """Train one model with the pretraining job (one rank, ZeRO-3); returns its HF export directory."""
    root = Path(cfg.out)
    out_dir = root / "runs" / name
    args = [*PRETRAIN_COMMAND, "--deepspeed_config", _deepspeed_config(cfg, root / "deepspeed.json"),
            "--out_dir", str(out_dir), "--data", str(root / "data" / "train"), "--val_data", str(root / "data" / "val"),
            "--tokenizer", str(tokenizer), "--model_config", cfg.model_config, "--seq_len", str(cfg.seq_len),
            "--max_steps", str(cfg.steps), "--warmup_steps", str(cfg.warmup_steps), "--lr", str(cfg.lr),
            "--min_lr", str(cfg.min_lr), "--seed", str(cfg.seed), "--eval_interval", str(cfg.steps),
            "--save_interval", str(cfg.steps), "--keep_checkpoints", "1",
            "--progress" if cfg.progress else "--no-progress"]
    if goldfish is None:
        args.append("--no-goldfish")
    else:
        args += ["--goldfish_k", str(goldfish[0]), "--goldfish_h", str(goldfish[1]),
                 "--goldfish_strategy", cfg.goldfish_strategy]
    with (root / f"train_{name}.log").open("w") as log:
        result = subprocess.run(args, stdout=log, stderr=None if cfg.progress else subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"training run {name!r} failed (exit {result.returncode}); see {root / f'train_{name}.log'}")
    return out_dir / "hf"


def export_control(cfg: ExperimentConfig, tokenizer: Path) -> Path:
    """The untrained initialisation (the same seed as the training runs) as an HF directory."""
    out = Path(cfg.out) / "control"
    save_hf_llama(Llama(LlamaConfig.from_json(cfg.model_config), seed=cfg.seed), str(out))
    copy_tokenizer(tokenizer, out)
    return out


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Prepare, train every run, evaluate all side by side; writes the report to cfg.out and returns it."""
    root = Path(cfg.out)
    tokenizer, heldout = prepare(cfg)
    models = {"standard": train_run(cfg, "standard", None, tokenizer)}
    for k, h in cfg.goldfish:
        models[f"goldfish_k{k}_h{h}"] = train_run(cfg, f"goldfish_k{k}_h{h}", (k, h), tokenizer)
    models["control"] = export_control(cfg, tokenizer)

    tok = load_tokenizer(str(tokenizer))
    k, h = cfg.goldfish[0] if cfg.goldfish else (4, 13)
    divergence_mask = GoldfishConfig(k=k, h=h, strategy=cfg.goldfish_strategy, exempt_ids=tok.special_ids)
    # Non-members are cut to the members' length (a row), or length alone would separate them.
    results = evaluate_models(models, root / "data" / "train" / "canary.jsonl", nonmembers=heldout, n=cfg.suffix_len,
                              num_beams=cfg.num_beams, goldfish=divergence_mask, max_length=cfg.seq_len + 1,
                              progress=cfg.progress)
    for name, run in results["runs"].items():
        metrics = root / "runs" / name / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            run["val_loss"] = next(r["val_loss"] for r in reversed(records) if r["kind"] == "val")
            run["train_loss"] = next(r["loss"] for r in reversed(records) if r["kind"] == "train")
    results["config"]["experiment"] = asdict(cfg)
    write_report(results, str(root), json_name="report.json")
    return results
