"""Bad optimizer steps: non-finite losses or gradient norms (the step is skipped) and loss spikes (logged).

Skipping is DeepSpeed's decision, which is the same on every rank: its ZeRO optimizer (stage3.py `step`)
computes the global gradient norm (all-reduced over the data- and model-parallel groups) and, when it is
NaN or Inf, applies no update, clears the gradients and does not advance the lr schedule
(`engine.was_step_applied()` is then False on every rank). The trainer makes a non-finite loss reach that
check too: it multiplies each micro-batch's loss by NaN where the loss is not finite, so its gradients are
NaN even when the loss's own gradient would be finite (an infinite loss from a -inf logit).
"""
from __future__ import annotations

import math

SPIKE_EMA_DECAY = 0.9  # the running mean of the loss: ema = 0.9 ema + 0.1 loss, over applied steps


class TooManySkippedSteps(RuntimeError):
    """--max_skipped_steps consecutive optimizer steps were skipped."""


class SkippedSteps:
    """Counts skipped optimizer steps, in a row and in total; an applied step resets the count in a row."""

    def __init__(self, max_skipped: int) -> None:
        self.max_skipped = max_skipped
        self.consecutive = self.total = 0

    def applied(self) -> None:
        self.consecutive = 0

    def skipped(self) -> None:
        self.consecutive += 1
        self.total += 1

    def check(self, step: int) -> None:
        """Raise TooManySkippedSteps when the last max_skipped steps, up to `step`, were all skipped."""
        if self.consecutive >= self.max_skipped:
            raise TooManySkippedSteps(
                f"step {step}: {self.consecutive} consecutive optimizer steps skipped for a non-finite loss or "
                f"gradient norm (--max_skipped_steps {self.max_skipped}); the weights are those of step "
                f"{step - self.consecutive}. The 'skipped' records of metrics.jsonl name the data rows; check "
                "them, lower --lr or tighten gradient_clipping, and continue with --resume")

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = state["consecutive"], state["total"]


class LossSpikeDetector:
    """A loss spike: an applied step's loss above `factor` times the running mean (an EMA with decay
    SPIKE_EMA_DECAY, started at the first loss) of the steps before it, once `warmup_steps` applied steps
    have fed the mean. factor 0 turns detection off."""

    def __init__(self, factor: float, warmup_steps: int) -> None:
        self.factor = factor
        self.warmup_steps = warmup_steps
        self.mean: float | None = None
        self.steps = 0

    def update(self, loss: float) -> float | None:
        """Feed one applied step's loss; returns the running mean it exceeded when it is a spike, else None."""
        if not math.isfinite(loss):
            raise ValueError(f"a loss spike detector takes finite losses, got {loss}")
        mean = self.mean
        spike = (self.factor > 0 and mean is not None and self.steps >= self.warmup_steps
                 and loss > self.factor * mean)
        self.mean = loss if mean is None else SPIKE_EMA_DECAY * mean + (1.0 - SPIKE_EMA_DECAY) * loss
        self.steps += 1
        return mean if spike else None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.steps = state["mean"], state["steps"]
