"""The paper's "extreme memorization" experiment on our own pipeline, from scratch or from a pretrained Llama.

The same model, from the same start, is trained for E epochs on D documents (each at the start of its own
padded row, the paper's canary setup) once with the standard loss and once per goldfish setting, by the
pretraining job (goldfish-pretrain, DeepSpeed ZeRO-3) under the chosen launcher, ranks, DeepSpeed config and
tensor-parallel size. The start is a random initialisation (seed) with a tokenizer trained on the documents,
or with `init_from_hf` an HF Llama directory, whose config, vocabulary and tokenizer are used as they are.
The control is the start itself: the untrained initialisation, or the pretrained checkpoint. All of them are
evaluated side by side with evaluate_models (extraction of the documents' suffixes, greedy and optionally by
beam search, membership inference against held-out documents, divergence at the tokens that run's own
goldfish mask drops; standard and control against the first setting's mask) and the validation loss on the
held-out documents, computed the same way for every model (heldout_loss).

Layout of `out`: tokenizer.model (when trained), data/{train,val}/ (packed), heldout.jsonl, deepspeed.json,
runs/<name>/ (each training run's out_dir, its HF export in runs/<name>/hf), train_<name>.log, control/
(HF export of a random initialisation; a pretrained control is read where it is), and the report:
report.json ({"config": ..., "runs": {name: {...}}}), summary.md and the plots.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.data import (CanarySet, PackedTokenDataset, builtin_documents, load_tokenizer, read_documents,
                              train_sentencepiece, write_packed_shards)
from goldfish_ds.eval.compare import evaluate_models
from goldfish_ds.eval.documents import find_tokenizer, load_model
from goldfish_ds.eval.membership import token_log_probs
from goldfish_ds.eval.report import write_report
from goldfish_ds.models import Llama, LlamaConfig, save_hf_llama
from goldfish_ds.models.hf import HFCheckpoint
from goldfish_ds.parallel.distributed import free_port
from goldfish_ds.training.arguments import (DEFAULT_CPU_DEEPSPEED_CONFIG, DEFAULT_GPU_DEEPSPEED_CONFIG,
                                            DEFAULT_MODEL_CONFIG, build_parser, goldfish_config, parse_args)
from goldfish_ds.training.export import copy_tokenizer

PRETRAIN_MODULE = "goldfish_ds.cli.pretrain"  # goldfish-pretrain, scripts/pretrain.py
LAUNCHERS = ("none", "deepspeed", "torchrun", "mpirun")
VAL_ROWS = 256  # held-out rows of the validation loss (the job's --eval_rows and heldout_loss)
# Options of the pretraining job that the experiment sets itself (their `dest`), so --pretrain_args may not.
RESERVED_PRETRAIN_OPTIONS = ("config", "deepspeed_config", "out_dir", "max_steps", "resume", "resume_from", "seed",
                             "local_rank", "model_config", "init_from_hf", "tensor_parallel", "data", "val_data",
                             "tokenizer", "seq_len", "goldfish", "goldfish_k", "goldfish_h", "goldfish_strategy",
                             "lr", "min_lr", "warmup_steps", "eval_interval", "eval_rows", "save_interval",
                             "keep_checkpoints", "export_hf", "progress")


@dataclass
class ExperimentConfig:
    """What to train and evaluate, and how to launch the training runs.

    goldfish: (k, h) settings, one goldfish run each. micro_batch: rows per rank and micro-step (None: 8 with
    the generated DeepSpeed config, the file's own with deepspeed_config). pretrain_args: further options of
    the pretraining job, the same for every run (not those the experiment sets: RESERVED_PRETRAIN_OPTIONS).
    """

    out: str
    data: str | None = None  # JSONL with "text"; None: Python's bundled documentation topics
    num_docs: int = 32
    num_heldout: int = 32
    epochs: int = 100
    goldfish: list[tuple[int, int]] = field(default_factory=lambda: [(4, 13)])
    goldfish_strategy: str = "hash-table"
    model_config: str | None = None  # None: the tiny model (or init_from_hf's config)
    init_from_hf: str | None = None  # an HF Llama directory: every run starts from it, and it is the control
    tokenizer: str | None = None  # None: init_from_hf's own, or one trained on the documents
    launcher: str = "none"
    nproc_per_node: int = 1
    tensor_parallel: int = 1
    deepspeed_config: str | None = None  # None: the package's ZeRO-3 config (zero3_gpu_bf16 with CUDA, zero3_cpu)
    pretrain_args: list[str] = field(default_factory=list)
    seq_len: int = 256
    suffix_len: int = 50
    micro_batch: int | None = None
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    seed: int = 1234
    num_beams: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("num_docs", "epochs", "seq_len", "suffix_len", "nproc_per_node", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExperimentConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"ExperimentConfig: micro_batch must be >= 1, got {self.micro_batch}")
        if self.num_beams is not None and self.num_beams < 2:
            raise ValueError(f"ExperimentConfig: num_beams (--beams) must be >= 2, got {self.num_beams}")
        if self.suffix_len >= self.seq_len:
            raise ValueError(f"ExperimentConfig: suffix_len ({self.suffix_len}) must be < seq_len ({self.seq_len})")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"ExperimentConfig: launcher must be one of {list(LAUNCHERS)}, got {self.launcher!r}")
        if self.launcher == "none" and self.nproc_per_node != 1:
            raise ValueError(f"ExperimentConfig: launcher 'none' runs one process; nproc_per_node "
                             f"{self.nproc_per_node} needs launcher deepspeed, torchrun or mpirun")
        if self.nproc_per_node % self.tensor_parallel:
            raise ValueError(f"ExperimentConfig: tensor_parallel ({self.tensor_parallel}) must divide nproc_per_node "
                             f"({self.nproc_per_node})")
        if self.init_from_hf is not None and self.model_config is not None:
            raise ValueError("ExperimentConfig: model_config and init_from_hf exclude each other (the model config "
                             "of init_from_hf is its config.json)")
        for k, h in self.goldfish:
            GoldfishConfig(k=k, h=h, strategy=self.goldfish_strategy)  # validated before anything runs
        model = self.model()  # a readable Llama config (and checkpoint) before anything runs
        if self.seq_len > model.max_position_embeddings:
            raise ValueError(f"ExperimentConfig: seq_len ({self.seq_len}) exceeds the model's "
                             f"max_position_embeddings ({model.max_position_embeddings}, {self.model_config_path})")
        if model.num_key_value_heads % self.tensor_parallel:
            raise ValueError(f"ExperimentConfig: tensor_parallel ({self.tensor_parallel}) must divide the model's "
                             f"num_key_value_heads ({model.num_key_value_heads}, {self.model_config_path})")
        if self.num_docs % self.global_batch:
            raise ValueError(f"ExperimentConfig: num_docs ({self.num_docs}) must be a multiple of the global batch "
                             f"({self.global_batch} = micro-batch x gradient accumulation x data-parallel size "
                             f"{self.data_parallel_size}) so every epoch sees every document once")
        for goldfish in self.run_settings().values():  # the job's own parser checks pretrain_args
            self.goldfish_mask(goldfish, special_ids=())

    # ---- the start --------------------------------------------------------------------------------------
    @property
    def model_config_path(self) -> str:
        if self.init_from_hf is not None:
            return str(Path(self.init_from_hf) / "config.json")
        return self.model_config or DEFAULT_MODEL_CONFIG

    def model(self) -> LlamaConfig:
        """The architecture of every run; with init_from_hf, that directory must be an HF Llama checkpoint."""
        if self.init_from_hf is None:
            return LlamaConfig.from_json(self.model_config_path)
        root = Path(self.init_from_hf)
        if not root.is_dir():
            raise FileNotFoundError(f"--init_from_hf {self.init_from_hf!r} is not a directory")
        try:
            model = LlamaConfig.from_json(self.model_config_path)
            HFCheckpoint(str(root))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"--init_from_hf {self.init_from_hf} is not an HF Llama checkpoint: {e}") from None
        return model

    def tokenizer_path(self) -> Path | None:
        """The tokenizer the runs use: --tokenizer, else init_from_hf's own; None: one is trained."""
        if self.tokenizer is not None:
            return Path(self.tokenizer)
        if self.init_from_hf is None:
            return None
        try:
            return Path(find_tokenizer(self.init_from_hf))
        except FileNotFoundError:
            raise FileNotFoundError(f"--init_from_hf {self.init_from_hf} has no tokenizer (tokenizer.model or "
                                    "tokenizer.json): give its tokenizer with --tokenizer") from None

    # ---- the layout -------------------------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        return self.nproc_per_node // self.tensor_parallel

    def deepspeed_settings(self) -> dict:
        """The DeepSpeed config of every run: deepspeed_config (or the package's default for this machine) with
        micro_batch as its train_micro_batch_size_per_gpu when given (8 for the default config)."""
        path = self.deepspeed_config or (DEFAULT_GPU_DEEPSPEED_CONFIG if torch.cuda.is_available()
                                         else DEFAULT_CPU_DEEPSPEED_CONFIG)
        if not Path(path).is_file():
            raise FileNotFoundError(f"--deepspeed_config {path!r} does not exist")
        config = json.loads(Path(path).read_text())
        micro = self.micro_batch if self.micro_batch is not None else (8 if self.deepspeed_config is None else None)
        if micro is not None:
            config.pop("train_batch_size", None)  # recomputed by the job from the new micro-batch
            config["train_micro_batch_size_per_gpu"] = micro
            if self.deepspeed_config is None:
                config["gradient_accumulation_steps"] = 1
        return config

    @property
    def global_batch(self) -> int:
        config = self.deepspeed_settings()
        return (config.get("train_micro_batch_size_per_gpu", 1) * config.get("gradient_accumulation_steps", 1)
                * self.data_parallel_size)

    @property
    def steps(self) -> int:
        return self.epochs * self.num_docs // self.global_batch

    def launch_prefix(self) -> list[str]:
        """The command that starts the pretraining job on nproc_per_node ranks (before its options)."""
        n = str(self.nproc_per_node)
        if self.launcher == "none":
            return [sys.executable, "-m", PRETRAIN_MODULE]
        if self.launcher == "deepspeed":
            return [_launcher("deepspeed"), "--num_gpus", n, "--master_port", str(free_port()), "--module",
                    PRETRAIN_MODULE]
        if self.launcher == "torchrun":
            return [_launcher("torchrun"), "--nproc_per_node", n, "--master_port", str(free_port()), "-m",
                    PRETRAIN_MODULE]
        # slot:OVERSUBSCRIBE keeps local ranks in rank order when ranks outnumber cores (DESIGN_NOTES)
        return [_launcher("mpirun"), "-np", n, "--map-by", "slot:OVERSUBSCRIBE", sys.executable, "-m",
                PRETRAIN_MODULE]

    # ---- the runs ---------------------------------------------------------------------------------------
    def run_settings(self) -> dict[str, tuple[int, int] | None]:
        """name -> goldfish (k, h), None for the standard loss: every training run."""
        return {"standard": None, **{f"goldfish_k{k}_h{h}": (k, h) for k, h in self.goldfish}}

    def run_arguments(self, name: str, goldfish: tuple[int, int] | None) -> list[str]:
        """The pretraining job's options of one run (pretrain_args first: the experiment's own come after)."""
        root = Path(self.out)
        tokenizer = self.tokenizer_path() or root / "tokenizer.model"
        start = (["--init_from_hf", self.init_from_hf] if self.init_from_hf is not None
                 else ["--model_config", self.model_config_path])
        args = [*self.pretrain_args, "--deepspeed_config", str(root / "deepspeed.json"), "--out_dir",
                str(root / "runs" / name), "--data", str(root / "data" / "train"), "--val_data",
                str(root / "data" / "val"), "--tokenizer", str(tokenizer), *start,
                "--tensor_parallel", str(self.tensor_parallel), "--seq_len", str(self.seq_len),
                "--max_steps", str(self.steps), "--warmup_steps", str(self.warmup_steps), "--lr", str(self.lr),
                "--min_lr", str(self.min_lr), "--seed", str(self.seed), "--eval_interval", str(self.steps),
                "--eval_rows", str(VAL_ROWS), "--save_interval", str(self.steps), "--keep_checkpoints", "1",
                "--export_hf", "--progress" if self.progress else "--no-progress"]
        if goldfish is None:
            return args + ["--no-goldfish"]
        return args + ["--goldfish", "--goldfish_k", str(goldfish[0]), "--goldfish_h", str(goldfish[1]),
                       "--goldfish_strategy", self.goldfish_strategy]

    def goldfish_mask(self, goldfish: tuple[int, int] | None, special_ids: tuple) -> GoldfishConfig | None:
        """The GoldfishConfig the pretraining job trains that run with (pretrain_args included: window, exempt
        ids...), from the job's own parser; raises ValueError for pretrain_args it refuses or that the
        experiment sets itself."""
        parser = build_parser()
        given, unknown = _parse_known(parser, self.pretrain_args)
        if unknown:
            raise ValueError(f"--pretrain_args: the pretraining job has no option {' '.join(unknown)} "
                             "(goldfish-pretrain --help lists them)")
        defaults = vars(parser.parse_args([]))
        reserved = [f"--{dest}" for dest in RESERVED_PRETRAIN_OPTIONS if vars(given)[dest] != defaults[dest]]
        if reserved:
            raise ValueError(f"--pretrain_args: {', '.join(reserved)} set by the experiment itself (its own options "
                             "--epochs, --seq_len, --goldfish, --init_from_hf, --deepspeed_config, ... decide them)")
        return goldfish_config(parse_args(self.run_arguments("check", goldfish)), special_ids)


def _parse_known(parser, argv: list[str]):
    """parser.parse_known_args, with argparse's exit on a bad value turned into a ValueError."""
    try:
        return parser.parse_known_args(argv)
    except SystemExit:
        raise ValueError(f"--pretrain_args {shlex.join(argv)!r}: refused by the pretraining job's parser (its "
                         "message is above)") from None


def _launcher(name: str) -> str:
    """The launcher's executable: on PATH, or next to this Python (a virtual environment's bin/)."""
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).is_file():
        raise FileNotFoundError(f"launcher {name!r} not found on PATH or in {Path(sys.executable).parent} "
                                "(pip install -r requirements.txt)")
    return path


def _documents(cfg: ExperimentConfig) -> list[str]:
    texts = list(read_documents([cfg.data])) if cfg.data else builtin_documents()
    if len(texts) < cfg.num_docs + 1:
        raise ValueError(f"{cfg.data or 'the built-in corpus'} has {len(texts)} documents; the experiment needs "
                         f"num_docs ({cfg.num_docs}) plus at least one held-out document")
    return texts


def prepare(cfg: ExperimentConfig) -> tuple[Path, list[dict]]:
    """Tokenizer (the given one, or one trained on all the documents), canary training data, held-out validation
    data, the DeepSpeed config. Returns the tokenizer path and the held-out records."""
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    texts = _documents(cfg)
    members, heldout = texts[:cfg.num_docs], texts[cfg.num_docs:cfg.num_docs + cfg.num_heldout]
    model = cfg.model()
    tok_path = cfg.tokenizer_path() or Path(train_sentencepiece(texts, str(root / "tokenizer"),
                                                                vocab_size=model.vocab_size))
    tok = load_tokenizer(str(tok_path))
    if tok.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} tokens, more than the model's vocab_size "
                         f"{model.vocab_size} ({cfg.model_config_path})")
    canary = CanarySet(members, [tok.encode_document(t) for t in members], seq_len=cfg.seq_len)
    write_packed_shards([], str(root / "data" / "train"), model.vocab_size, canary=canary)
    write_packed_shards((tok.encode_document(t) for t in heldout), str(root / "data" / "val"), model.vocab_size)
    records = [{"text": t} for t in heldout]
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (root / "deepspeed.json").write_text(json.dumps(cfg.deepspeed_settings(), indent=1))
    return tok_path, records


def train_run(cfg: ExperimentConfig, name: str, goldfish: tuple[int, int] | None) -> Path:
    """Train one model with the pretraining job under cfg's launcher; returns its HF export directory."""
    root = Path(cfg.out)
    command = cfg.launch_prefix() + cfg.run_arguments(name, goldfish)
    log_path = root / f"train_{name}.log"
    with log_path.open("w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=None if cfg.progress else subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"training run {name!r} failed (exit {result.returncode}); see {log_path}")
    return root / "runs" / name / "hf"


def control_model(cfg: ExperimentConfig, tokenizer: Path) -> Path:
    """The start of every run as an HF directory: init_from_hf itself, or the random initialisation (the
    training runs' seed) exported to out/control."""
    if cfg.init_from_hf is not None:
        return Path(cfg.init_from_hf)
    out = Path(cfg.out) / "control"
    save_hf_llama(Llama(cfg.model(), seed=cfg.seed), str(out))
    copy_tokenizer(tokenizer, out)
    return out


@torch.no_grad()
def heldout_loss(model_dir: str | Path, val_dir: str | Path, seq_len: int, num_rows: int = VAL_ROWS,
                 device: str | torch.device = "cpu", batch_size: int = 16) -> float:
    """Mean next-token loss of an HF causal LM over every target of the first num_rows rows (seq_len + 1 ids)
    of a packed data directory: the pretraining job's validation loss (--eval_rows) of the same rows."""
    val = PackedTokenDataset(str(val_dir), seq_len)
    rows = [val[i].tolist() for i in range(min(num_rows, len(val)))]
    if not rows:
        raise ValueError(f"{val_dir} has no row of {seq_len + 1} tokens")
    model = load_model(model_dir, device)
    log_probs = torch.cat(token_log_probs(model, rows, batch_size=batch_size))
    return float(-log_probs.double().mean())


def _last(records: list[dict], kind: str, key: str) -> float | None:
    return next((r[key] for r in reversed(records) if r["kind"] == kind), None)


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Prepare, train every run, evaluate all side by side; writes the report to cfg.out and returns it."""
    root = Path(cfg.out)
    tokenizer, heldout = prepare(cfg)
    settings = cfg.run_settings()
    models = {name: train_run(cfg, name, goldfish) for name, goldfish in settings.items()}
    models["control"] = control_model(cfg, tokenizer)
    settings["control"] = None

    special = load_tokenizer(str(tokenizer)).special_ids
    first = cfg.goldfish[0] if cfg.goldfish else (4, 13)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"config": {}, "runs": {}}
    for name, model_dir in models.items():
        # each goldfish run's divergence against its own mask; the standard run and the control against the first
        mask = cfg.goldfish_mask(settings[name] or first, special)
        # Non-members are cut to the members' length (a row), or length alone would separate them.
        one = evaluate_models({name: model_dir}, root / "data" / "train" / "canary.jsonl", nonmembers=heldout,
                              n=cfg.suffix_len, num_beams=cfg.num_beams, goldfish=mask, tokenizer=str(tokenizer),
                              max_length=cfg.seq_len + 1, device=device, progress=cfg.progress)
        run = one["runs"][name]
        run["goldfish"] = None if settings[name] is None else dict(zip(("k", "h"), settings[name]))
        run["val_loss"] = heldout_loss(model_dir, root / "data" / "val", cfg.seq_len, device=device)
        metrics = root / "runs" / name / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            run["train_loss"], run["job_val_loss"] = _last(records, "train", "loss"), _last(records, "val", "val_loss")
        results["runs"][name] = run
        results["config"] = {**one["config"], "models": {n: str(d) for n, d in models.items()},
                             "goldfish": asdict(cfg.goldfish_mask(first, special))}
    results["config"]["experiment"] = asdict(cfg)
    write_report(results, str(root), json_name="report.json")
    return results
