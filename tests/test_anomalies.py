"""Bad steps (goldfish_ds/training/anomalies.py): a NaN loss or gradient on one rank skips that optimizer step on
every rank (the weights and optimizer state stay those of the step before), is logged with its data rows, and
--max_skipped_steps skipped steps in a row stop the job; loss spikes are logged."""
from __future__ import annotations

import itertools

import pytest
import torch
from test_preemption import checkpoint_tensors
from test_training import corpus, ds_config, launch, records, train_args  # noqa: F401 (corpus is a fixture)

from goldfish_ds.data import PackedTokenDataset, ShardedSampler
from goldfish_ds.training.anomalies import SPIKE_EMA_DECAY, LossSpikeDetector, SkippedSteps, TooManySkippedSteps
from goldfish_ds.training.optim import warmup_cosine_lr

MAX_STEPS = 12
SPIKE_FACTOR = 1.000001  # any rise of the loss above its running mean is a spike
LR = 2e-2  # high enough for the loss to rise now and then
# Rank 1's loss at step 3 and rank 0's at steps 9-11 are NaN (with finite gradients); rank 0's gradients at step 6.
FAULTS = "nan_loss:3:1,nan_grad:6:0,nan_loss:9-11:0"
SKIPPED = {3: (1, "non-finite loss"), 6: (0, "non-finite gradient norm"), 9: (0, "non-finite loss"),
           10: (0, "non-finite loss"), 11: (0, "non-finite loss")}


def test_spike_detector_follows_its_ema():
    detector = LossSpikeDetector(factor=1.5, warmup_steps=2)
    losses = [4.0, 3.0, 7.0, 3.0, 6.5, 2.0]
    mean, expected = None, []
    for i, loss in enumerate(losses):
        expected.append(mean if i >= 2 and loss > 1.5 * mean else None)
        mean = loss if mean is None else SPIKE_EMA_DECAY * mean + (1 - SPIKE_EMA_DECAY) * loss
    assert [detector.update(x) for x in losses] == expected
    assert [i for i, m in enumerate(expected) if m is not None] == [2, 4]  # 7 > 1.5 x 3.9, 6.5 > 1.5 x 4.089
    assert LossSpikeDetector(factor=0, warmup_steps=0).update(1.0) is None
    with pytest.raises(ValueError, match="finite losses"):
        detector.update(float("nan"))


def test_skipped_steps_counts_the_ones_in_a_row():
    counter = SkippedSteps(max_skipped=2)
    counter.skipped()
    counter.check(5)
    counter.applied()
    counter.skipped()
    counter.check(7)
    counter.skipped()
    message = r"step 8: 2 consecutive .* \(--max_skipped_steps 2\); the weights are those of step 6"
    with pytest.raises(TooManySkippedSteps, match=message):
        counter.check(8)
    assert counter.state_dict() == {"consecutive": 2, "total": 3}


@pytest.fixture(scope="module")
def poisoned_run(corpus, tmp_path_factory):
    """2 ZeRO-3 ranks (deepspeed launcher), a checkpoint after every step, the FAULTS above; 1 warmup step, a high
    lr."""
    out = tmp_path_factory.mktemp("poisoned")
    args = train_args(corpus, out, ds_config(out / "ds.json", 2, 1), "--max_steps", str(MAX_STEPS),
                      "--save_interval", "1", "--keep_checkpoints", "20", "--eval_interval", "0",
                      "--warmup_steps", "1", "--lr", str(LR), "--spike_factor", str(SPIKE_FACTOR))
    return out, launch("deepspeed", 2, args, expect_ok=False, env={"GOLDFISH_DS_CRASH": FAULTS})


def test_a_nan_skips_the_step_on_every_rank(corpus, poisoned_run):
    out, result = poisoned_run
    skipped = records(out, "skipped")
    assert [(r["step"], r["reason"]) for r in skipped] == [(s, why) for s, (_, why) in SKIPPED.items()]
    assert [(r["consecutive"], r["total"]) for r in skipped] == [(1, 1), (1, 2), (1, 3), (2, 4), (3, 5)]
    assert [r["step"] for r in records(out)] == [1, 2, 4, 5, 7, 8]  # training went on after each skip
    # The rows logged: the poisoned rank's micro-batch for a NaN loss, every rank's for a NaN gradient norm.
    data = PackedTokenDataset(str(corpus / "train"), 64)
    per_rank = [list(itertools.islice(iter(ShardedSampler(len(data), rank, 2, seed=0, micro_batch_size=2,
                                                          accumulation_steps=1)), 2 * MAX_STEPS)) for rank in (0, 1)]
    for record in skipped:
        rank, reason = SKIPPED[record["step"]]
        ranks = (rank,) if reason == "non-finite loss" else (0, 1)
        step_rows = [row for r in ranks for row in per_rank[r][2 * record["step"] - 2:2 * record["step"]]]
        assert record["rows"] == sorted(step_rows)
    # The weights and AdamW state after a skipped step are those before it; after an applied step they are not.
    checkpoints = out / "checkpoints"
    tensors = {s: checkpoint_tensors(checkpoints / f"step_{s:08d}") for s in range(2, 11)}
    for step in range(3, 11):
        same = all(torch.equal(tensors[step][k], tensors[step - 1][k]) for k in tensors[step])
        assert same == (step in SKIPPED), step
    # The lr schedule advances on applied steps only (DeepSpeed's rule): step s uses schedule position
    # s - 1 - (steps skipped before s).
    for record in records(out) + skipped:
        before = sum(1 for s in SKIPPED if s < record["step"])
        assert record["lr"] == pytest.approx(warmup_cosine_lr(record["step"] - 1 - before, lr=LR, min_lr=3e-4,
                                                              warmup_steps=1, max_steps=MAX_STEPS), rel=1e-12)


def test_max_skipped_steps_stops_the_job(poisoned_run):
    out, result = poisoned_run
    assert result.returncode == 1
    assert ("pretrain.py: error: step 11: 3 consecutive optimizer steps skipped for a non-finite loss or gradient "
            "norm (--max_skipped_steps 3); the weights are those of step 8") in result.stderr, result.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000010"


def test_spikes_are_logged_against_the_running_mean(poisoned_run):
    """The "spike" records are the steps whose loss exceeds SPIKE_FACTOR x the EMA of the applied steps before
    it, recomputed here from the logged losses, after --warmup_steps (1) applied step; skipped steps do not count."""
    out, _ = poisoned_run
    mean, expected = None, []
    for i, record in enumerate(records(out)):
        if i >= 1 and record["loss"] > SPIKE_FACTOR * mean:
            expected.append(record["step"])
        mean = record["loss"] if mean is None else SPIKE_EMA_DECAY * mean + (1 - SPIKE_EMA_DECAY) * record["loss"]
    assert expected and [r["step"] for r in records(out, "spike")] == expected
    assert all(r["running_mean"] < r["loss"] for r in records(out, "spike"))
