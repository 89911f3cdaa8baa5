"""The goldfish loss in the HF training stack: transformers' Trainer, TRL's SFTTrainer, PEFT models.

Two ways in, giving the same loss:
- `GoldfishTrainer` / `GoldfishSFTTrainer`: the Trainer runs our fused kernel (`goldfish_cross_entropy`) on
  the model's logits. A subclass rather than `Trainer(compute_loss_func=...)`, because the Trainer counts
  `num_items_in_batch` (the loss denominator over the accumulated batch) from the raw labels, so a
  `compute_loss_func` would divide by every supervised target, dropped ones included; and because TRL
  deprecates `compute_loss_func` (it costs SFTTrainer an extra forward pass) in favour of overriding
  `compute_loss`. One mixin serves both trainers.
- `GoldfishDataCollator`: wraps any collator and sets the dropped targets of its `labels` to -100
  (`apply_goldfish`), for the stock Trainer / SFTTrainer and the model's own loss.

Both compute the mask from the next-token targets exactly as the model's own loss shifts them
(`causal_lm_targets`), and both hash the goldfish windows over the batch's token content, not its labels: the
same shift of `input_ids` (`causal_lm_window_ids`, padding per `attention_mask` excluded), passed to the mask as
`window_ids`. So a response token's drop decision depends only on the tokens of its window, whether the prompt
before it is masked (-100, as TRL's completion_only_loss / assistant_only_loss and prompt-masking collators
do) or supervised. A batch without `input_ids` falls back to hashing the labels (the official behaviour).
Either way in, a batch gets the same mask, and both normalise as the Trainer does since transformers 4.46: the
sum of the loss over the kept targets of the accumulated batch (all ranks, with `average_tokens_across_devices`)
divided by the number of kept targets. That is the goldfish definition (the mean over kept targets, which the
paper's code computes with ignore_index) taken over the whole optimizer step instead of per micro-batch, so
gradient accumulation does not change the loss. Labels already -100 (prompts in
SFT, padding) stay ignored and are never counted as dropped. Evaluation (`trainer.evaluate()`) reports the
standard loss over every supervised target, as goldfish_ds' pretraining validation does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers import Trainer

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.loss import goldfish_cross_entropy
from goldfish_ds.mask import apply_goldfish, goldfish_mask

IGNORE_INDEX = -100  # transformers' label convention: the Trainer counts and the models' losses skip it


def check_hf_goldfish_config(cfg: GoldfishConfig, caller: str) -> None:
    """GoldfishConfig checks for the HF stack: its ignore_index must be transformers' -100."""
    if not isinstance(cfg, GoldfishConfig):
        raise TypeError(f"{caller}: goldfish must be a goldfish_ds.GoldfishConfig, got {type(cfg).__name__}")
    if cfg.ignore_index != IGNORE_INDEX:
        raise ValueError(f"{caller}: GoldfishConfig.ignore_index must be {IGNORE_INDEX} (transformers' label "
                         f"convention), got {cfg.ignore_index}")


def _check_labels(labels: Any, caller: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.dtype != torch.int64:
        got = (f"{labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise ValueError(f"{caller}: labels must be an int64 [batch, seq] tensor of causal-LM labels, got {got}")
    return labels


def causal_lm_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets [B, T] aligned with the logits [B, T, V], from HF causal-LM labels [B, T].

    targets[:, t] = labels[:, t + 1] and the last column is -100: the shift transformers' ForCausalLMLoss does.
    """
    return F.pad(_check_labels(labels, "causal_lm_targets")[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_window_ids(labels: torch.Tensor, input_ids: Optional[torch.Tensor],
                         attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The ids the goldfish windows hash [B, T], aligned with causal_lm_targets(labels): input_ids[:, t + 1].

    Positions whose next token is padding (attention_mask 0, left or right padding) and the last column are
    -100, as the labels have them. labels must equal input_ids wherever they are not -100 (causal-LM labels of
    these inputs). None when input_ids is None: the mask then hashes the labels.
    """
    if input_ids is None:
        return None
    labels = _check_labels(labels, "causal_lm_window_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape != labels.shape or input_ids.dtype != torch.int64:
        got = (f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"causal_lm_window_ids: input_ids must be an int64 tensor of labels' shape "
                         f"{tuple(labels.shape)}, got {got}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != labels.shape:
            got = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                   else type(attention_mask).__name__)
            raise ValueError(f"causal_lm_window_ids: attention_mask must be a [batch, seq] padding mask of labels' "
                             f"shape {tuple(labels.shape)}, got {got}")
        input_ids = input_ids.masked_fill(attention_mask.to(input_ids.device) == 0, IGNORE_INDEX)
    differ = labels.ne(IGNORE_INDEX) & labels.ne(input_ids.to(labels.device))
    if differ.any():
        raise ValueError(f"causal_lm_window_ids: labels must be -100 or equal input_ids at every position (causal-LM "
                         f"labels of these inputs; padding, attention_mask 0, must be -100), {int(differ.sum())} "
                         "positions differ")
    return causal_lm_targets(input_ids)


def goldfish_labels(labels: torch.Tensor, cfg: GoldfishConfig, step: int = 0, *,
                    input_ids: Optional[torch.Tensor] = None,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF causal-LM labels [B, T] with the targets the goldfish mask drops set to -100 (a copy).

    Column 0 is never a target and is kept. Feed the result to any model's own loss. With input_ids [B, T]
    (and attention_mask), the windows hash the tokens (causal_lm_window_ids), so -100 prompt labels do not
    change the drops; without, they hash the labels.
    """
    window_ids = causal_lm_window_ids(labels, input_ids, attention_mask)
    targets = apply_goldfish(causal_lm_targets(labels), cfg, step, window_ids=window_ids)
    return torch.cat([labels[:, :1], targets[:, :-1]], dim=1)


def goldfish_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: GoldfishConfig,
    num_items_in_batch: Optional[torch.Tensor | int] = None,
    *,
    step: int = 0,
    input_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The fused goldfish loss of a causal LM's logits [B, T, V] against its HF labels [B, T] (unshifted).

    num_items_in_batch: the number of kept targets of the whole accumulated batch (what GoldfishTrainer
    passes); the loss is then this batch's kept-target loss sum divided by it. None: the mean over this
    batch's kept targets. input_ids, attention_mask [B, T]: the windows hash the tokens, as in goldfish_labels.
    The gradient is written into the logits buffer (their values are gone afterwards).
    """
    targets = causal_lm_targets(labels).to(logits.device)
    window_ids = causal_lm_window_ids(labels, input_ids, attention_mask)
    window_ids = None if window_ids is None else window_ids.to(logits.device)
    if num_items_in_batch is None:
        return goldfish_cross_entropy(logits, targets, cfg, step=step, window_ids=window_ids)
    total = goldfish_cross_entropy(logits, targets, cfg, "sum", step=step, window_ids=window_ids)
    return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)


class GoldfishDataCollator:
    """Wraps a data collator: the `labels` of its batches get the goldfish-dropped targets set to -100.

    collator: any collator whose batches hold causal-LM `labels` [B, T] (transformers'
    `DataCollatorForLanguageModeling(tokenizer, mlm=False)`, TRL's `DataCollatorForLanguageModeling`, ...);
    the windows hash the batch's `input_ids` (padding per `attention_mask` excluded), or its labels without them.
    Use it with the stock Trainer or SFTTrainer: the model's own loss and the Trainer's token count then
    both see only the kept targets. The "random" strategy needs the training step, which a collator does
    not know: use GoldfishTrainer for it.
    """

    def __init__(self, collator: Callable[[list], dict], goldfish: GoldfishConfig) -> None:
        check_hf_goldfish_config(goldfish, "GoldfishDataCollator")
        if goldfish.strategy == "random":
            raise ValueError("GoldfishDataCollator: strategy 'random' draws a new mask every training step, which a "
                             "collator does not know; use GoldfishTrainer, or another strategy")
        self.collator = collator
        self.goldfish = goldfish

    def __call__(self, features: list) -> dict:
        batch = self.collator(features)
        _check_supported_batch(batch, "GoldfishDataCollator")
        if "labels" not in batch:
            raise ValueError(f"GoldfishDataCollator: the wrapped collator's batch has no 'labels' (keys: "
                             f"{sorted(batch)})")
        batch["labels"] = goldfish_labels(batch["labels"], self.goldfish, input_ids=batch.get("input_ids"),
                                          attention_mask=batch.get("attention_mask"))
        return batch


def _check_supported_batch(batch: dict, caller: str) -> None:
    """Refuses the batch layouts whose goldfish windows would span examples or be misaligned: pre-shifted labels
    and padding-free rows (several examples flattened into one row, told apart only by their position_ids)."""
    if "shift_labels" in batch:
        raise ValueError(f"{caller}: batches with pre-shifted 'shift_labels' (context-parallel "
                         "collators) are not supported; give causal-LM 'labels' only")
    if "position_ids" in batch and "attention_mask" not in batch:
        raise ValueError(f"{caller}: padding-free batches ('position_ids' without 'attention_mask', e.g. TRL's "
                         "padding_free=True or transformers' DataCollatorWithFlattening) are not supported: their "
                         "goldfish windows would span examples; use a padding collator")


class GoldfishTrainerMixin:
    """Trains with the fused goldfish loss: mix in before a transformers Trainer class (see the module docstring).

    goldfish: the GoldfishConfig (keyword argument; ignore_index -100). The mask of step s uses
    `step=s` (only the "random" strategy reads it). Training logs also carry `goldfish_drop_rate`, the realised
    fraction of the supervised targets dropped since the last log (over all ranks with the Trainer's default
    `average_tokens_across_devices`, else this rank's). Evaluation uses the wrapped trainer's own loss, the
    standard one.
    """

    loss_is_scaled_for_ga = True  # Trainer: the loss is already normalised over the accumulated batch

    def __init__(self, *args: Any, goldfish: GoldfishConfig, **kwargs: Any) -> None:
        name = type(self).__name__
        check_hf_goldfish_config(goldfish, name)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(f"{name}: compute_loss_func must be None: {name} computes the goldfish loss itself")
        super().__init__(*args, **kwargs)
        self.goldfish = goldfish
        if self.args.n_gpu > 1:
            raise ValueError(f"{name}: nn.DataParallel (several GPUs in one process) is not supported; launch one "
                             "process per GPU (torchrun, accelerate launch, deepspeed)")
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (parallelism.tp_enabled or parallelism.cp_enabled or parallelism.sp_enabled):
            raise ValueError(f"{name}: tensor, context and sequence parallelism (parallelism_config) are not "
                             "supported; use data parallelism or DeepSpeed ZeRO")
        self._goldfish_counts = torch.zeros(2, dtype=torch.int64)  # supervised and dropped targets since the last log

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The accumulated batch and its number of kept targets (gathered over ranks as the Trainer does)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.zeros(2, dtype=torch.int64)  # supervised and dropped targets
        for batch in batch_samples:
            _check_supported_batch(batch, type(self).__name__)
            if "labels" not in batch:
                raise ValueError(f"{type(self).__name__}: training batches need causal-LM 'labels' (keys: "
                                 f"{sorted(batch)}); give the data collator labels, e.g. "
                                 "DataCollatorForLanguageModeling(tokenizer, mlm=False)")
            targets = causal_lm_targets(batch["labels"])
            window_ids = causal_lm_window_ids(batch["labels"], batch.get("input_ids"), batch.get("attention_mask"))
            dropped = goldfish_mask(targets, self.goldfish, self.state.global_step, window_ids=window_ids)
            counts += torch.stack([targets.ne(IGNORE_INDEX).sum(), dropped.sum()]).cpu()
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).reshape(-1, 2).sum(0)  # one all-gather of 2 numbers a rank
        self._goldfish_counts += counts.cpu()
        return batch_samples, counts[0] - counts[1]

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[torch.Tensor] = None):
        """Training: the fused goldfish loss on the model's logits. Evaluation: the wrapped trainer's loss."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        _check_supported_batch(inputs, type(self).__name__)
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**model_inputs)
        loss = goldfish_causal_lm_loss(outputs.logits, inputs["labels"], self.goldfish, num_items_in_batch,
                                       step=self.state.global_step, input_ids=inputs.get("input_ids"),
                                       attention_mask=inputs.get("attention_mask"))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the ranks' gradients are averaged, the count is global
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        supervised, dropped = self._goldfish_counts.tolist()
        if "loss" in logs and supervised > 0:
            logs["goldfish_drop_rate"] = dropped / supervised
            self._goldfish_counts.zero_()
        super().log(logs, start_time)


class GoldfishTrainer(GoldfishTrainerMixin, Trainer):
    """transformers.Trainer with the fused goldfish loss: `GoldfishTrainer(model, args, goldfish=cfg, ...)`."""


def __getattr__(name: str) -> Any:
    # GoldfishSFTTrainer is built on first use, so that this module imports without TRL installed.
    if name == "GoldfishSFTTrainer":
        from trl import SFTTrainer

        cls = type("GoldfishSFTTrainer", (GoldfishTrainerMixin, SFTTrainer), {
            "__module__": __name__,
            "__doc__": "TRL's SFTTrainer with the fused goldfish loss on the supervised (non -100) targets: "
                       "`GoldfishSFTTrainer(model, args=SFTConfig(...), goldfish=cfg, ...)`. During training it "
                       "logs the loss and goldfish_drop_rate, not TRL's entropy and token-accuracy metrics.",
        })
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # and GoldfishSFTTrainer, which needs TRL
    "GoldfishDataCollator",
    "GoldfishTrainer",
    "GoldfishTrainerMixin",
    "causal_lm_targets",
    "causal_lm_window_ids",
    "goldfish_causal_lm_loss",
    "goldfish_labels",
]
