"""--loss_normalization: the gradient of one optimizer step of the real DeepSpeed ZeRO-3 job (gloo ranks on CPU,
started by real launchers), read before the optimizer update, against one big batch in one process with plain torch.

One global batch of 8 rows (4 packed rows, 4 canary rows holding 0, 5, 19 and 32 targets, the rest PADDING), goldfish
k=2, h=1, so the kept counts differ between micro-batches. global_tokens gives the gradient of (sum of kept-target
losses / their count G) for each split of those rows: one rank x 8 accumulation micro-batches of 1 row (python),
DP=2 x 2 of 2 (torchrun), TP=2 x DP=2 x 1 of 4 (mpirun); micro_batch (the default) gives the mean of the
per-micro-batch means (one rank x 8 of 1), which differs.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import free_port
from safetensors.torch import load_file
from test_launchers import launcher
from test_training import ds_config, launch_env

from goldfish_ds import GoldfishConfig
from goldfish_ds.data import CanarySet, PackedTokenDataset, ShardedSampler, write_packed_shards
from goldfish_ds.models import Llama, LlamaConfig
from goldfish_ds.models.hf import export_hf_state_dict
from goldfish_ds.reference import reference_goldfish_mask
from goldfish_ds.training import build_parser, parse_args
from goldfish_ds.training.loss_normalization import global_tokens_loss_scale

GRADS = str(Path(__file__).resolve().parent / "loss_normalization_grads.py")
SEQ_LEN, VOCAB, ROWS = 32, 256, 8
GOLDFISH = GoldfishConfig(k=2, h=1)  # no tokenizer: no exempt ids
SEED = 1234  # pretrain.py's default --seed
MODEL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "tie_word_embeddings": True, "initializer_range": 0.02}
# (launcher, ranks, tensor parallel, micro-batch, accumulation, --loss_normalization): the same 8 rows in each.
LAYOUTS = {
    "dp1 x gas8 x mb1": ("python", 1, 1, 1, 8, "global_tokens"),
    "dp2 x gas2 x mb2": ("torchrun", 2, 1, 2, 2, "global_tokens"),
    "tp2 x dp2 x gas1 x mb4": ("mpirun", 4, 2, 4, 1, "global_tokens"),
    "micro_batch: dp1 x gas8 x mb1": ("python", 1, 1, 1, 8, "micro_batch"),
}
# fp32 rounding only: every element within 5e-6 of its tensor's largest gradient (measured: at most 6.1e-7, in the
# TP=2 x DP=2 run; the micro_batch gradient differs from the global_tokens one by 3.7 times the largest).
ATOL_OF_MAX = 5e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 rows of random ids: 4 packed rows (32 targets each) and 4 canary rows of 1, 6, 20 and 33 ids."""
    root = tmp_path_factory.mktemp("loss_normalization")
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, VOCAB, (4 * SEQ_LEN + 1,), generator=g).tolist()
    canaries = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 6, 20, 33)]
    write_packed_shards([packed], str(root / "train"), VOCAB,
                        canary=CanarySet([f"canary {i}" for i in range(4)], canaries, SEQ_LEN))
    (root / "model.json").write_text(json.dumps(MODEL))
    return root


def job_args(data: Path, out: Path, tp: int, micro: int, accumulation: int, normalization: str) -> list:
    return ["--deepspeed_config", ds_config(out.with_suffix(".json"), micro, accumulation), "--out_dir", str(out),
            "--data", str(data / "train"), "--model_config", str(data / "model.json"), "--seq_len", str(SEQ_LEN),
            "--tensor_parallel", str(tp), "--goldfish_k", str(GOLDFISH.k), "--goldfish_h", str(GOLDFISH.h),
            "--loss_normalization", normalization, "--max_steps", "1", "--eval_interval", "0", "--no-progress",
            "--no-export_hf"]


def launch_command(kind: str, nproc: int) -> list:
    if kind == "python":
        return [sys.executable]
    if kind == "torchrun":
        return [launcher("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return [launcher("mpirun"), "-np", str(nproc), "--map-by", "slot:OVERSUBSCRIBE", sys.executable]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    """Each layout's step under its launcher: {layout: (HF-keyed full gradients, the step's train record)}."""
    out = {}
    for name, (kind, nproc, tp, micro, accumulation, normalization) in LAYOUTS.items():
        grads = tmp_path_factory.mktemp("grads")
        result = subprocess.run(launch_command(kind, nproc) + [GRADS, str(grads)] +
                                job_args(data, grads / "run", tp, micro, accumulation, normalization),
                                env=launch_env(nproc), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, name + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
        out[name] = load_file(grads / "model.safetensors"), json.loads((grads / "record.json").read_text())
    return out


def step_rows(dp: int, micro: int, accumulation: int) -> list:
    """The training-set rows of the first step's micro-batches, [dp rank][micro-batch] -> rows (the job's sampler)."""
    ranks = [list(itertools.islice(iter(ShardedSampler(ROWS, d, dp, micro_batch_size=micro,
                                                       accumulation_steps=accumulation)), micro * accumulation))
             for d in range(dp)]
    return [[rows[a * micro:(a + 1) * micro] for a in range(accumulation)] for rows in ranks]


def inputs_and_labels(data: Path, rows: list) -> tuple:
    dataset = PackedTokenDataset(str(data / "train"), SEQ_LEN)
    tokens = torch.stack([dataset[r] for r in rows])
    labels = tokens[:, 1:]
    return tokens[:, :-1].clamp_min(0), torch.where(labels < 0, -100, labels)  # PADDING targets are ignored


def kept_loss_sum_and_count(model: Llama, data: Path, rows: list) -> tuple:
    """Plain torch: the float64 sum of the cross-entropies of the targets the goldfish mask keeps, and their count."""
    inputs, labels = inputs_and_labels(data, rows)
    kept = labels.ne(-100) & ~reference_goldfish_mask(labels, GOLDFISH)
    logits = model(inputs).double()
    return F.cross_entropy(logits[kept], labels[kept], reduction="sum"), int(kept.sum())


def reference_gradients(data: Path, normalization: str, dp: int = 1, micro: int = ROWS, accumulation: int = 1):
    """The gradient of one big batch in one process, by autograd: global_tokens, sum of kept losses / G over all
    rows; micro_batch, the mean over the dp x accumulation micro-batches of each one's mean over its kept targets.
    Returns (HF-keyed gradients, the step's mean loss over kept targets, G)."""
    model = Llama(LlamaConfig.from_dict(MODEL), seed=SEED)
    total, count = kept_loss_sum_and_count(model, data, list(range(ROWS)))
    if normalization == "global_tokens":
        objective = total / count
    else:
        means = [s / max(n, 1) for s, n in (kept_loss_sum_and_count(model, data, rows)
                                            for rank in step_rows(dp, micro, accumulation) for rows in rank)]
        objective = sum(means) / len(means)
    objective.backward()
    return export_hf_state_dict(model, grads=True), total.item() / count, count


@pytest.fixture(scope="module")
def global_reference(data):
    return reference_gradients(data, "global_tokens")


def assert_gradients_equal(grads: dict, reference: dict, what: str) -> None:
    assert grads.keys() == reference.keys(), what
    for key, expected in reference.items():
        np.testing.assert_allclose(grads[key].double(), expected.double(), rtol=0,
                                   atol=ATOL_OF_MAX * expected.abs().max().item(), err_msg=f"{what}: {key}")


def test_the_kept_counts_differ_between_rows(data):
    _, labels = inputs_and_labels(data, list(range(ROWS)))
    counts = (labels.ne(-100) & ~reference_goldfish_mask(labels, GOLDFISH)).sum(1).tolist()
    assert 0 in counts and len(set(counts)) >= 4, counts


@pytest.mark.parametrize("layout", [name for name, layout in LAYOUTS.items() if layout[-1] == "global_tokens"])
def test_global_tokens_gradient_is_the_global_batch_mean_for_every_split(runs, global_reference, layout):
    grads, record = runs[layout]
    reference, loss, _ = global_reference
    assert_gradients_equal(grads, reference, layout)
    norm = torch.cat([g.double().flatten() for g in reference.values()]).norm().item()
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-6)  # DeepSpeed's own norm, before clipping
    assert record["loss"] == pytest.approx(loss, rel=1e-6)  # the logged loss: the mean over the step's kept targets


def test_micro_batch_gradient_is_the_mean_of_micro_batch_means_and_differs(runs, data, global_reference):
    grads, record = runs["micro_batch: dp1 x gas8 x mb1"]
    reference, loss, _ = reference_gradients(data, "micro_batch", dp=1, micro=1, accumulation=8)
    assert_gradients_equal(grads, reference, "micro_batch")
    assert record["loss"] == pytest.approx(loss, rel=1e-6)  # logged the same way in both modes
    gap = max(((grads[k] - g).abs().max() / g.abs().max()).item() for k, g in global_reference[0].items())
    assert gap > 1000 * ATOL_OF_MAX, gap  # so the global_tokens comparison above could fail


def test_scale_undoes_deepspeeds_averaging_and_survives_no_kept_target():
    assert global_tokens_loss_scale(torch.tensor(48), accumulation_steps=4, averaged_over=3).item() == 0.25
    nothing = global_tokens_loss_scale(torch.tensor(0), accumulation_steps=4, averaged_over=3)
    assert nothing.item() == 12.0  # G = 0: a finite factor of zero losses, so a zero gradient, not NaN


def test_loss_normalization_is_documented_and_checked(tmp_path):
    text = " ".join(build_parser().format_help().split())
    assert "--loss_normalization {micro_batch,global_tokens} micro_batch: each micro-batch's loss is the mean" in text
    assert "Use global_tokens when kept counts vary between micro-batches" in text and "(default: micro_batch)" in text
    assert parse_args([]).loss_normalization == "micro_batch"
    with pytest.raises(SystemExit):
        parse_args(["--loss_normalization", "tokens"])  # argparse: "invalid choice: 'tokens' (choose from ...)"
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"loss_normalization": "tokens"}))
    with pytest.raises(ValueError, match=r"--loss_normalization must be one of \['micro_batch', 'global_tokens'\], "
                                         r"got 'tokens'"):
        parse_args(["--config", str(config)])
