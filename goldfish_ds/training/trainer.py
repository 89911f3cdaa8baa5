"""The pretraining job: a Llama on DeepSpeed (ZeRO 1-3) with tensor parallelism and the goldfish loss.

`run(args)` does everything `scripts/pretrain.py` promises, in this order: start torch.distributed for
whichever launcher started the ranks, build the TP/DP groups, check every input (model config, DeepSpeed
config with its "auto" sizes fitted to the model, data, tokenizer, goldfish options) before any model is
built, build the model under `deepspeed.zero.Init`, wrap it in a DeepSpeed engine with AdamW and the
warmup-cosine schedule, resume if asked, then train, log, validate, checkpoint and export. A stop signal or
the --exit_after_minutes budget ends training early with a checkpoint (preemption.py); a step with a
non-finite loss or gradient norm is skipped and logged (anomalies.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.data import (
    PADDING,
    PackedTokenDataset,
    ShardedSampler,
    Tokenizer,
    load_tokenizer,
)
from goldfish_ds.loss import GoldfishStats
from goldfish_ds.models import Llama, LlamaConfig, documents_from_eos, load_hf_llama
from goldfish_ds.parallel import (
    LossTargets,
    data_parallel_group,
    data_parallel_rank,
    data_parallel_world_size,
    init_distributed,
    initialize_model_parallel,
    mpu,
    vocab_parallel_goldfish_cross_entropy,
)
from goldfish_ds.parallel.layers import uninitialised_weights
from goldfish_ds.training.anomalies import LossSpikeDetector, SkippedSteps
from goldfish_ds.training.arguments import (
    DEFAULT_CPU_DEEPSPEED_CONFIG,
    DEFAULT_GPU_DEEPSPEED_CONFIG,
    goldfish_boundary_id,
    goldfish_config,
    required_eos_id,
)
from goldfish_ds.training.builtin_corpus import prepare_builtin_corpus
from goldfish_ds.training.checkpoint import CheckpointManager, check_shared_directory
from goldfish_ds.training.deepspeed_config import load_deepspeed_config
from goldfish_ds.training.export import export_hf
from goldfish_ds.training.faults import maybe_crash, maybe_hold, maybe_poison_loss
from goldfish_ds.training.flops import device_peak_tflops, step_throughput, training_flops_per_token
from goldfish_ds.training.loss_normalization import global_tokens_loss_scale, kept_targets
from goldfish_ds.training.memorization import MemorizationEvaluation, memorization_canaries
from goldfish_ds.training.metrics import HostMemoryPhases, MetricsLogger
from goldfish_ds.training.optim import adamw, lr_scheduler
from goldfish_ds.training.partitions import load_hf_into_partitions
from goldfish_ds.training.preemption import StopRequests
from goldfish_ds.training.zero3_master_weights import fp32_master_shares_partition

ARGS_FILE = "args.json"


# DeepSpeed still calls torch.distributed's older collective names, which warn on every step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def select_accelerator() -> None:
    """DeepSpeed's CPU accelerator (gloo) when there is no GPU, unless the user chose one."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def unlink_deepspeed_shm_buffer() -> None:
    """Remove the name of this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce (its shm_comm op), which
    DeepSpeed never unlinks: each CPU job would leave 69 MB of shared memory per rank behind. By the time
    deepspeed.init_distributed returns on every rank (the barrier), each has mapped all the others' buffers,
    and the mappings outlive the name."""
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
            f"{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


class Job:
    """One training job's state: groups, data, model engine, sampler, checkpoints."""

    def __init__(self, args: argparse.Namespace) -> None:
        select_accelerator()
        import deepspeed

        self.args = args
        self.launch = init_distributed(timeout_s=args.dist_timeout, master_addr=args.master_addr,
                                       master_port=args.master_port, network_interface=args.network_interface)
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group just created
        unlink_deepspeed_shm_buffer()
        initialize_model_parallel(args.tensor_parallel, timeout_s=args.dist_timeout)
        self.rank, self.dp_rank, self.dp_size = dist.get_rank(), data_parallel_rank(), data_parallel_world_size()
        self.device = torch.device(f"cuda:{self.launch.local_rank}" if torch.cuda.is_available() else "cpu")
        self.stop_requests = StopRequests(args.exit_after_minutes, self.device)  # the budget counts from here
        self.out_dir = Path(args.out_dir)
        check_shared_directory(self.out_dir)  # before rank 0 writes anything there for the others

        self.model_cfg = LlamaConfig.from_json(str(Path(args.init_from_hf) / "config.json") if args.init_from_hf
                                               else args.model_config)
        ds_path = args.deepspeed_config or (DEFAULT_GPU_DEEPSPEED_CONFIG if torch.cuda.is_available()
                                            else DEFAULT_CPU_DEEPSPEED_CONFIG)
        self.ds_config = load_deepspeed_config(ds_path, self.dp_size, self.model_cfg)  # "auto" sizes from the model
        self.micro_batch = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.dtype = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else (
            torch.float16 if self.ds_config.get("fp16", {}).get("enabled") else torch.float32)

        self.data_dir, self.val_dir, self.tokenizer_path = self._resolve_data()
        self.train_set = PackedTokenDataset(self.data_dir, args.seq_len, verify=args.verify_data)
        self.val_set = PackedTokenDataset(self.val_dir, args.seq_len) if self.val_dir else None
        tokenizer = load_tokenizer(self.tokenizer_path) if self.tokenizer_path else None
        self._check_vocabulary(tokenizer)
        self.document_eos = (required_eos_id(tokenizer, "--document_attention",  # the EOS that ends documents
                                             "finds the documents of a packed row by their EOS tokens")
                             if args.document_attention else None)
        self.goldfish: GoldfishConfig | None = goldfish_config(args, tokenizer.special_ids if tokenizer else (),
                                                               goldfish_boundary_id(args, tokenizer))
        self.ignore_index = self.goldfish.ignore_index if self.goldfish else -100
        self.memorization = None
        if args.memorization_eval_interval:
            canaries = memorization_canaries(args.memorization_data, self.data_dir, args.memorization_suffix_len,
                                             tokenizer)
            self.memorization = MemorizationEvaluation(canaries, args.memorization_suffix_len, self.micro_batch,
                                                       tokenizer, self.device)

        global_batch = self.micro_batch * self.accumulation * self.dp_size
        if len(self.train_set) < global_batch:
            raise ValueError(f"training data {self.data_dir} has {len(self.train_set)} rows of {args.seq_len + 1} "
                             f"tokens, fewer than one global batch of {global_batch} (--deepspeed_config {ds_path}: "
                             f"train_micro_batch_size_per_gpu {self.micro_batch} x gradient_accumulation_steps "
                             f"{self.accumulation} x {self.dp_size} data-parallel ranks): use more data (--data), a "
                             "shorter --seq_len, smaller batches or fewer ranks")
        if self.val_set is not None and len(self.val_set) == 0:
            raise ValueError(f"--val_data {self.val_dir} has no row of --seq_len + 1 = {args.seq_len + 1} tokens: "
                             "give more validation text or a shorter --seq_len")
        self.sampler = ShardedSampler(len(self.train_set), self.dp_rank, self.dp_size, seed=args.data_seed,
                                      micro_batch_size=self.micro_batch, accumulation_steps=self.accumulation)
        self.memory = HostMemoryPhases(str(self.out_dir))
        self.flops_per_token = training_flops_per_token(self.model_cfg, args.seq_len)
        self.peak_tflops = device_peak_tflops(args.peak_tflops, self.device, self.dtype)
        self.engine = self._build_engine(deepspeed)
        self.checkpoints = CheckpointManager(str(self.out_dir / "checkpoints"), keep=args.keep_checkpoints)
        self.step = 0
        self.input_tokens = self.supervised_tokens = 0
        self.skipped = SkippedSteps(args.max_skipped_steps)
        self.spikes = LossSpikeDetector(args.spike_factor, warmup_steps=args.warmup_steps)

    # ---- set-up -------------------------------------------------------------------------------------
    def _resolve_data(self) -> tuple[str, str | None, str | None]:
        args = self.args
        if args.data:
            return args.data, args.val_data, args.tokenizer
        if args.val_data or args.tokenizer:
            raise ValueError("--val_data and --tokenizer describe --data: give --data too (or none of them for the "
                             "built-in corpus)")
        root = self.out_dir / "data"
        if self.rank == 0:
            prepare_builtin_corpus(str(root), vocab_size=self.model_cfg.vocab_size)
        dist.barrier()
        return str(root / "train"), str(root / "val"), str(root / "tokenizer.model")

    def _check_vocabulary(self, tokenizer: Tokenizer | None) -> None:
        vocab = self.model_cfg.vocab_size
        if tokenizer is not None and tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer {self.tokenizer_path} has {tokenizer.vocab_size} tokens, more than the "
                             f"model's vocab_size {vocab}: use a model config with vocab_size >= "
                             f"{tokenizer.vocab_size}")
        if self.train_set.vocab_size > vocab:
            raise ValueError(f"data {self.data_dir} was tokenized with a vocabulary of {self.train_set.vocab_size}, "
                             f"larger than the model's vocab_size {vocab}")

    def _build_engine(self, deepspeed):
        """The model under zero.Init with ZeRO-3 (from --init_from_hf too: each rank fills its own partitions),
        then the engine; the peak host memory of both phases goes to out_dir/memory.jsonl."""
        args = self.args
        zero3 = self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        drawn = uninitialised_weights() if args.init_from_hf else nullcontext()  # no random draws for loaded weights
        with self.memory.measure("import" if args.init_from_hf else "init"):
            with deepspeed.zero.Init(data_parallel_group=data_parallel_group(), mpu=mpu,
                                     config_dict_or_path=self.ds_config, enabled=zero3), drawn:
                model = Llama(self.model_cfg, seed=args.seed, activation_checkpointing=args.activation_checkpointing)
            if self.model_cfg.tie_word_embeddings and zero3:
                # The LM head uses the embedding's weight outside the embedding's forward.
                deepspeed.zero.register_external_parameter(model.lm_head, model.embed_tokens.weight)
            if args.init_from_hf:
                (load_hf_into_partitions if zero3 else load_hf_llama)(model, args.init_from_hf)
        with self.memory.measure("engine"):
            optimizer = adamw(model, lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
            with fp32_master_shares_partition():  # fp32: 16 bytes a parameter, not DeepSpeed's 20
                engine, _, _, _ = deepspeed.initialize(
                    model=model, optimizer=optimizer, config=self.ds_config, mpu=mpu, dist_init_required=False,
                    lr_scheduler=lambda opt: lr_scheduler(opt, lr=args.lr, min_lr=args.min_lr,
                                                          warmup_steps=args.warmup_steps, max_steps=args.max_steps))
        return engine

    # ---- state --------------------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "input_tokens": self.input_tokens,
                "supervised_tokens": self.supervised_tokens,
                "goldfish": asdict(self.goldfish) if self.goldfish else None, "model": asdict(self.model_cfg),
                "layout": self.layout(), "data_rows": len(self.train_set),
                "skipped_steps": self.skipped.state_dict(), "loss_mean": self.spikes.state_dict()}

    def layout(self) -> dict:
        return {"world_size": dist.get_world_size(), "tensor_parallel": self.args.tensor_parallel,
                "micro_batch": self.micro_batch, "accumulation": self.accumulation, "seq_len": self.args.seq_len}

    def resume(self) -> None:
        tag = self.checkpoints.resume_tag(self.args.resume_from, verify_hashes=self.args.verify_checkpoint)
        mine = json.loads(json.dumps(self.client_state()))  # as the checkpoint's JSON holds it (tuples as lists)
        with self.memory.measure("resume"):
            state = self.checkpoints.load(self.engine, tag, reshard_to=mine["layout"] if self.args.reshard else None)
        if state["goldfish"] is not None:  # written before boundary_id existed: it had no boundaries
            state["goldfish"].setdefault("boundary_id", None)
        for key, what in (("goldfish", "goldfish settings (the masks would change mid-run)"),
                          ("model", "model config"), ("layout", "batch layout"), ("data_rows", "training data")):
            if key == "layout" and self.args.reshard:
                continue  # checked, and the sampler position converted, by the load
            if state[key] != mine[key]:
                raise ValueError(f"--resume: the checkpoint's {what} differ from this run's:\n  checkpoint: "
                                 f"{state[key]}\n  this run:   {mine[key]}")
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.input_tokens, self.supervised_tokens = (state["step"], state["input_tokens"],
                                                                state["supervised_tokens"])
        if "skipped_steps" in state:  # checkpoints written before skipped steps were counted have neither
            self.skipped.load_state_dict(state["skipped_steps"])
            self.spikes.load_state_dict(state["loss_mean"])

    def save(self) -> str:
        with self.memory.measure("checkpoint"):
            return self.checkpoints.save(self.engine, self.step, self.client_state())

    # ---- steps --------------------------------------------------------------------------------------
    def _batch(self, rows: list[torch.Tensor], supervised: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs, labels and window_ids [B, seq_len] from B rows of seq_len + 1 ids; negative ids (PADDING) are not
        targets. SFT data: `supervised` (each row's PackedTokenDataset.supervised) makes every other target -100 in
        labels, and window_ids are the row's shifted ids (the goldfish mask hashes those); otherwise None."""
        tokens = torch.stack(rows).to(self.device)
        targets = tokens[:, 1:]
        not_targets = targets < 0  # canary rows' tails, validation filler rows
        if supervised is not None:
            not_targets |= ~torch.stack(supervised).to(self.device)[:, 1:]
        labels = torch.where(not_targets, self.ignore_index, targets)
        return tokens[:, :-1].clamp_min(0), labels, targets if supervised is not None else None

    def _read_batch(self, dataset: PackedTokenDataset, rows: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """_batch of these rows of `dataset`, with their supervision when it is SFT data."""
        supervised = [dataset.supervised(row) for row in rows] if dataset.sft is not None else None
        return self._batch([dataset[row] for row in rows], supervised)

    def _forward(self, inputs: torch.Tensor, loss_targets: LossTargets | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, GoldfishStats]:
        """This rank's vocabulary slice of the logits of inputs [B, T], or with loss_targets the model's fused loss
        (Llama.forward); under --document_attention each packed document attends only to itself."""
        documents = None if self.document_eos is None else documents_from_eos(inputs, self.document_eos)
        return self.engine(inputs, documents=documents, loss_targets=loss_targets)

    def _train_loss(self, inputs: torch.Tensor, labels: torch.Tensor, window_ids: torch.Tensor | None,
                    reduction: str, logged: bool) -> tuple[torch.Tensor, GoldfishStats]:
        """The goldfish loss of one micro-batch and its statistics: from the LM head itself under --fused_lm_head
        (no logits buffer), else from this rank's logits by vocab_parallel_goldfish_cross_entropy. On a step that is
        not logged (logged False) the dropped targets' loss is not computed, since under --fused_lm_head it costs an
        LM-head matmul over their rows: loss_dropped_tokens and loss_all_tokens are NaN then."""
        if self.args.fused_lm_head:
            out = self._forward(inputs, LossTargets(labels, self.goldfish, reduction, self.step, window_ids,
                                                    return_stats=logged))
        else:
            out = vocab_parallel_goldfish_cross_entropy(self._forward(inputs), labels, self.goldfish,
                                                        reduction=reduction, step=self.step, return_stats=logged,
                                                        vocab_size=self.model_cfg.vocab_size, window_ids=window_ids)
        if logged:
            return out
        kept = kept_targets(labels, self.goldfish, self.ignore_index, self.step, window_ids)
        dropped = labels.ne(self.ignore_index).sum() - kept
        loss_kept = out.detach() if reduction == "mean" else out.detach() / kept.clamp(min=1)
        nan = torch.full_like(loss_kept, math.nan)
        return out, GoldfishStats(kept_tokens=kept, dropped_tokens=dropped,
                                  drop_rate=dropped / (kept + dropped).clamp(min=1), loss_kept=loss_kept,
                                  loss_all_tokens=nan, loss_dropped_tokens=nan)

    def _logs_step(self, step: int) -> bool:
        """Whether step (counted from 1) writes its "train" record: every --log_interval-th, and the last."""
        return step % self.args.log_interval == 0 or step == self.args.max_steps

    def train_step(self, rows: Iterator[int]) -> dict:
        """One optimizer step (accumulation micro-batches); returns its "train" record, summed over DP ranks,
        or its "skipped" record when DeepSpeed skipped the update for a non-finite gradient norm."""
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # kept, dropped, kept/dropped loss, inputs
        lr = self.engine.get_lr()[0]
        # This rank's rows, its micro-batches and whether each one's loss was finite.
        batches = [[next(rows) for _ in range(self.micro_batch)] for _ in range(self.accumulation)]
        micro_batches = [self._read_batch(self.train_set, batch) for batch in batches]
        reduction, loss_scale = self._loss_reduction_and_scale(micro_batches)
        logged = self._logs_step(self.step + 1)
        finite = []
        for inputs, labels, window_ids in micro_batches:
            loss, stats = self._train_loss(inputs, labels, window_ids, reduction, logged)
            loss = maybe_poison_loss(loss * loss_scale, self.step + 1)
            finite.append(torch.isfinite(loss.detach()))
            # x 1 where finite (exact); x NaN otherwise, so that DeepSpeed's gradient-norm check skips the step on
            # every rank even where the loss's gradient is finite (anomalies.py).
            self.engine.backward(loss * torch.where(finite[-1], 1.0, math.nan).to(loss.dtype))
            self.engine.step()
            sums += torch.stack([stats.kept_tokens.double(), stats.dropped_tokens.double(),
                                 stats.loss_kept.double() * stats.kept_tokens,
                                 stats.loss_dropped_tokens.double() * stats.dropped_tokens,
                                 torch.tensor(float(inputs.numel()), dtype=torch.float64, device=self.device)])
        dist.all_reduce(sums, group=data_parallel_group())  # one host sync per optimizer step, below
        kept, dropped, kept_loss, dropped_loss, inputs_seen = sums.tolist()
        self.step += 1
        if not self.engine.was_step_applied():  # the same on every rank: the norm is a global one
            return self._skipped_record(batches, torch.stack(finite).tolist(), lr)
        self.input_tokens += int(inputs_seen)
        self.supervised_tokens += int(kept)
        grad_norm = self.engine.get_global_grad_norm()
        targets = max(kept + dropped, 1)
        return {"kind": "train", "step": self.step, "loss": kept_loss / max(kept, 1),
                "loss_all_tokens": (kept_loss + dropped_loss) / targets,
                "loss_dropped_tokens": dropped_loss / max(dropped, 1), "drop_rate": dropped / targets,
                "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "input_tokens": self.input_tokens, "supervised_tokens": self.supervised_tokens,
                "step_input_tokens": int(inputs_seen)}

    def _loss_reduction_and_scale(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
                                  ) -> tuple[str, torch.Tensor | float]:
        """The reduction of each micro-batch's loss and the factor it is multiplied by, per --loss_normalization:
        the mean over the micro-batch's kept targets x 1, or their sum x the global_tokens scale, from the kept
        count of the global batch (one all-reduce of one integer over the data-parallel group)."""
        if self.args.loss_normalization == "micro_batch":
            return "mean", 1.0
        kept = sum(kept_targets(labels, self.goldfish, self.ignore_index, self.step, window_ids)
                   for _, labels, window_ids in micro_batches)
        dist.all_reduce(kept, group=data_parallel_group())
        return "sum", global_tokens_loss_scale(kept, self.accumulation,
                                               self.dp_size if self.engine.gradient_average else 1)

    def _skipped_record(self, batches: list[list[int]], finite: list[bool], lr: float) -> dict:
        """The "skipped" record of this step: the training-set rows of every micro-batch (of any rank) whose
        loss was not finite, or of the whole step when only the gradient norm was. One all_gather_object."""
        bad = [row for rows, ok in zip(batches, finite) if not ok for row in rows]
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, (bad, [row for rows in batches for row in rows]))
        bad_rows = sorted({row for rows, _ in views for row in rows})
        if bad_rows:
            reason = "non-finite loss"
        elif self.dtype == torch.float16:
            reason = "fp16 loss-scale overflow"  # DeepSpeed's loss scaler lowers its scale: not counted
        else:
            reason = "non-finite gradient norm"
        return {"kind": "skipped", "step": self.step, "reason": reason, "lr": lr,
                "rows": bad_rows or sorted({row for _, rows in views for row in rows})}

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean standard (not goldfish) loss over every target (SFT data: every supervised one) of the first
        --eval_rows validation rows.

        Row i goes to data-parallel rank i % dp_size. Every rank runs the same number of micro-batches
        (under ZeRO-3 each forward gathers parameters with collectives), filled up with PADDING rows that
        hold no target, so the rows evaluated, and the loss up to float rounding, are the same for any layout.
        """
        self.engine.eval()
        num_rows = min(self.args.eval_rows, len(self.val_set))
        mine = range(self.dp_rank, num_rows, self.dp_size)
        passes = math.ceil(math.ceil(num_rows / self.dp_size) / self.micro_batch)
        padding = torch.full((self.args.seq_len + 1,), PADDING, dtype=torch.int64)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, targets
        for first in range(0, passes * self.micro_batch, self.micro_batch):
            rows = list(mine[first:first + self.micro_batch])
            fill = self.micro_batch - len(rows)
            no_target = torch.zeros_like(padding, dtype=torch.bool)
            supervised = ([self.val_set.supervised(row) for row in rows] + [no_target] * fill
                          if self.val_set.sft is not None else None)
            inputs, labels, _ = self._batch([self.val_set[row] for row in rows] + [padding] * fill, supervised)
            loss = vocab_parallel_goldfish_cross_entropy(self._forward(inputs), labels, None, reduction="sum",
                                                         in_place=False, vocab_size=self.model_cfg.vocab_size)
            sums += torch.stack([loss.double(), labels.ne(self.ignore_index).sum().double()])
        maybe_crash("validation", self.step)
        dist.all_reduce(sums, group=data_parallel_group())
        self.engine.train()
        total, targets = sums.tolist()
        return total / max(targets, 1.0)

    # ---- the job ------------------------------------------------------------------------------------
    def train(self) -> dict:
        args = self.args
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / ARGS_FILE).write_text(json.dumps(vars(args), indent=1))
        self.checkpoints.remove_partial()
        self.stop_requests.install()
        try:
            if args.resume or args.resume_from:
                self.resume()
            logger = MetricsLogger(str(self.out_dir), enabled=self.rank == 0, start_step=self.step,
                                   max_steps=args.max_steps, progress=args.progress,
                                   wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name,
                                   wandb_config={**vars(args), "model_flops_per_token": self.flops_per_token})
            rows = iter(self.sampler)
            with self.memory.measure("train"):  # checkpoints are phases of their own
                stopped = self._train_loop(rows, logger)
        finally:
            self.stop_requests.uninstall()
        hf_dir = None
        if args.export_hf and not stopped:
            hf_dir = str(self.out_dir / "hf")
            with self.memory.measure("export"):
                export_hf(self.engine.module, hf_dir, self.tokenizer_path, max_shard_size=args.hf_max_shard_size)
        summary = {"steps": self.step, "checkpoints": str(self.checkpoints.root), "metrics": str(logger.path),
                   "hf_export": hf_dir, "last_train": logger.last_record("train"),
                   "last_val": logger.last_record("val"), "stopped": stopped}
        if logger.tensorboard_dir:
            summary["tensorboard"] = logger.tensorboard_dir
        if logger.wandb_dir:
            summary["wandb"] = logger.wandb_dir
        logger.close()
        return summary

    def _train_loop(self, rows: Iterator[int], logger: MetricsLogger) -> str | None:
        """Train to --max_steps; returns None, or why it stopped early ("SIGTERM", "SIGUSR1",
        "exit_after_minutes") after writing a checkpoint of the last step. Raises TooManySkippedSteps."""
        args = self.args
        on_gpu = self.device.type == "cuda"
        saved = None
        since_record = [0, 0.0, 0]  # input tokens, seconds and applied steps since the last "train" record
        while self.step < args.max_steps:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            record = self.train_step(rows)
            elapsed = time.perf_counter() - start
            maybe_crash("step", self.step)
            maybe_hold(self.step, lambda: self.stop_requests.received != 0)
            logger.advance()
            if record["kind"] == "skipped":
                if record["reason"] == "fp16 loss-scale overflow":
                    logger.log(record)
                else:
                    self.skipped.skipped()
                    logger.log({**record, "consecutive": self.skipped.consecutive, "total": self.skipped.total})
                    self.skipped.check(self.step)  # raises at the --max_skipped_steps-th in a row
            else:
                self.skipped.applied()
                running_mean = self.spikes.update(record["loss"])
                if running_mean is not None:
                    logger.log({"kind": "spike", "step": self.step, "loss": record["loss"],
                                "running_mean": running_mean, "spike_factor": args.spike_factor})
                since_record = [since_record[0] + record.pop("step_input_tokens"), since_record[1] + elapsed,
                                since_record[2] + 1]
                if self._logs_step(self.step):
                    if on_gpu:  # this rank's device
                        record["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    tokens, seconds, steps = since_record
                    logger.log({**record, "tokens_per_s": tokens / seconds, "step_time_s": seconds / steps,
                                **step_throughput(tokens / steps, seconds / steps, self.flops_per_token,
                                                  dist.get_world_size(), self.peak_tflops)})
                    since_record = [0, 0.0, 0]
            if self.val_set is not None and args.eval_interval and (self.step % args.eval_interval == 0
                                                                    or self.step == args.max_steps):
                logger.log({"kind": "val", "step": self.step, "val_loss": self.validation_loss()})
            if self.memorization is not None and (self.step % args.memorization_eval_interval == 0
                                                  or self.step == args.max_steps):
                if (record := self.memorization.evaluate(self.engine, self.step, self.out_dir)) is not None:
                    logger.log(record)  # rank 0's
            if self.step % args.save_interval == 0 or self.step == args.max_steps:
                logger.write(f"step {self.step}: checkpoint {self.checkpoints.root / self.save()}")
                saved = self.step
            if self.step < args.max_steps and (reason := self.stop_requests.agreed()):
                if saved != self.step:
                    logger.write(f"step {self.step}: checkpoint {self.checkpoints.root / self.save()}")
                logger.write(f"step {self.step}: stopped by {reason}; continue with --resume")
                return reason
        return None


def run(args: argparse.Namespace) -> dict:
    """Train as the arguments say; returns a summary (paths, last metrics) on every rank."""
    return Job(args).train()
