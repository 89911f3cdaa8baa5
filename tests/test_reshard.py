"""`--resume --reshard`: a ZeRO-3 checkpoint written at data-parallel size 2 continues at DP=1 and DP=4, and one of
TP=2 x DP=1 at TP=2 x DP=2 (real DeepSpeed ranks on CPU, gloo), with the weights and Adam state it had and the loss
curve of the uninterrupted run; layouts it cannot continue in are refused by name."""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import free_port, run_distributed
from safetensors.torch import load_file
from test_launchers import launcher
from test_training import corpus, ds_config, launch, launch_env, losses, records, train_args  # noqa: F401

from goldfish_ds.data import ShardedSampler
from goldfish_ds.parallel import initialize_model_parallel
from goldfish_ds.training.checkpoint import CheckpointError, CheckpointManager
from goldfish_ds.training.reshard import check_reshard_layout, resharded_sampler_state

RESUME = str(Path(__file__).resolve().parent / "reshard_resume.py")
STEPS, SAVED = 10, 5
# One global batch of 8 rows in every layout, in micro-batches of 2: DP=2 x 2 accumulation steps (the checkpoint),
# DP=1 x 4, DP=4 x 1. The micro-batches hold the same rows in every layout (tests/test_training.py's layouts).
ACCUMULATION = {1: 4, 2: 2, 4: 1}


def run_args(corpus: Path, out: Path, dp: int, *extra: str) -> list:
    return train_args(corpus, out, ds_config(out.parent / f"{out.name}.json", 2, ACCUMULATION[dp]),
                      "--max_steps", str(STEPS), *extra)


@pytest.fixture(scope="module")
def dp2_run(corpus, tmp_path_factory):  # noqa: F811
    """The uninterrupted run at DP=2 (deepspeed launcher), checkpoints at steps 5 and 10; and, as the reference
    for the state after a conversion, DeepSpeed's own readers of its step-5 checkpoint: zero_to_fp32's fp32
    weights and ds_to_universal's per-parameter fp32 weights and Adam moments."""
    out = tmp_path_factory.mktemp("reshard") / "dp2"
    launch("deepspeed", 2, run_args(corpus, out, 2))
    tag = f"step_{SAVED:08d}"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(out / "checkpoints" / tag), "--output_folder", str(out / "universal"),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"], check=True, capture_output=True,
                   timeout=300)
    return out


def resume_from_step_5(run: Path, out: Path) -> None:
    """A copy of `run` whose latest checkpoint is step 5."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("universal"))
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    (out / "checkpoints" / "latest").write_text(f"step_{SAVED:08d}")


def resume_resharded(kind: str, nproc: int, args: list, state_file: Path) -> dict:
    """tests/reshard_resume.py under a launcher: resume with --reshard and train on; returns the state right after
    the conversion (gathered over data-parallel ranks; tensor-parallel rank 0's slices)."""
    command = {"python": [sys.executable],
               "torchrun": [launcher("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port())],
               "mpirun": [launcher("mpirun"), "-np", str(nproc), "--map-by", "slot:OVERSUBSCRIBE", sys.executable]}
    result = subprocess.run(command[kind] + [RESUME, str(state_file), *args, "--resume", "--reshard"],
                            env=launch_env(nproc), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return load_file(state_file)


def check_curve_continues(resumed: Path, uninterrupted: Path) -> None:
    """The run resumed at step 5 trains on as the uninterrupted one did: the same rows (sampler position), learning
    rates (schedule) and updates (Adam's step count and moments), so the same losses to float rounding."""
    records_resumed, reference = records(resumed), records(uninterrupted)
    assert [r["step"] for r in records_resumed] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses(resumed)[SAVED:], losses(uninterrupted)[SAVED:], rtol=0, atol=1e-4)
    assert [r["drop_rate"] for r in records_resumed] == [r["drop_rate"] for r in reference]
    assert [(r["lr"], r["input_tokens"], r["supervised_tokens"]) for r in records_resumed] == \
        [(r["lr"], r["input_tokens"], r["supervised_tokens"]) for r in reference]
    np.testing.assert_allclose([r["val_loss"] for r in records(resumed, "val")],
                               [r["val_loss"] for r in records(uninterrupted, "val")], rtol=1e-5)
    assert (resumed / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


@pytest.mark.parametrize("dp, kind", [(1, "python"), (4, "torchrun")])
def test_reshard_continues_the_weights_adam_state_and_curve(corpus, dp2_run, tmp_path, dp, kind):  # noqa: F811
    out = tmp_path / f"dp{dp}"
    resume_from_step_5(dp2_run, out)
    state = resume_resharded(kind, dp, run_args(corpus, out, dp), tmp_path / "state.safetensors")

    # Right after the conversion: every weight (the model's partitions and the fp32 masters) and both Adam moments
    # equal the DP=2 checkpoint's, bit for bit (the conversion only copies).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    weights = get_fp32_state_dict_from_zero_checkpoint(str(dp2_run / "checkpoints"), tag=f"step_{SAVED:08d}")
    names = sorted({key.rsplit("/", 1)[0] for key in state})
    assert len(names) == 38  # 4 layers x 9 tensors, the embedding (tied to the LM head) and the final norm
    for name in names:
        assert torch.equal(state[f"{name}/param"], weights[name]) and torch.equal(state[f"{name}/fp32"], weights[name])
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            universal = torch.load(dp2_run / "universal" / "zero" / name / f"{key}.pt", weights_only=True)
            assert torch.equal(state[f"{name}/{key}"].flatten(), universal.flatten()), (name, key)
    assert state["norm.weight/exp_avg_sq"].abs().sum() > 0  # trained moments, not fresh zeros
    check_curve_continues(out, dp2_run)


def test_reshard_keeps_the_tensor_parallel_slices(corpus, dp2_run, tmp_path):  # noqa: F811
    """TP=2 x DP=1 (mpirun -np 2) to step 10, then from its step-5 checkpoint TP=2 x DP=2 (mpirun -np 4): the state
    after the conversion is the checkpoint's (read here directly: at DP=1 each optimizer sub-group is its
    parameters' fp32 values, whole and in order), and the curve that of the uninterrupted TP=2 run (and of DP=2)."""
    source = tmp_path / "tp2dp1"
    launch("mpirun", 2, run_args(corpus, source, 1, "--tensor_parallel", "2"))
    out = tmp_path / "tp2dp2"
    resume_from_step_5(source, out)
    state = resume_resharded("mpirun", 4, run_args(corpus, out, 2, "--tensor_parallel", "2"),
                             tmp_path / "state.safetensors")
    checkpoint = source / "checkpoints" / f"step_{SAVED:08d}"
    shapes = torch.load(checkpoint / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)["param_shapes"]
    zero = torch.load(checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    zero = zero["optimizer_state_dict"]
    for group, params in enumerate(shapes):
        flat = {"fp32": zero["fp32_flat_groups"][group], **zero["optimizer_state_dict"]["state"][group]}
        offset = 0
        for name, shape in params.items():
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state[f"{name}/{key}"], flat[key][offset:offset + shape.numel()].view(shape)), name
            assert torch.equal(state[f"{name}/param"], state[f"{name}/fp32"])
            offset += shape.numel()
    assert state["embed_tokens.weight/fp32"].shape == (1024, 128)  # tensor-parallel rank 0's half of the vocabulary
    check_curve_continues(out, source)
    np.testing.assert_allclose(losses(out), losses(dp2_run), rtol=0, atol=1e-4)


def body_refusals(rank: int, world_size: int, checkpoints: str) -> None:
    """On 1 rank, a plain resume of the DP=2 checkpoint; on 2, with TP=2 (DP=1, so another global batch too), a
    resume with --reshard: both are refused before the engine (None here) is touched."""
    initialize_model_parallel(world_size)
    manager = CheckpointManager(checkpoints, keep=2)
    tag = f"step_{SAVED:08d}"
    if world_size == 1:
        with pytest.raises(CheckpointError, match="written by 2 ranks; this job has 1: resume with the same world size and "
                                             "layout, or add --reshard to continue it at another data-parallel size"):
            manager.load(None, tag)
        return
    with pytest.raises(ValueError) as refused:
        manager.load(None, tag, reshard_to=layout(1, 2, 2, tp=2))
    assert "--tensor_parallel 1 in the checkpoint, 2 in this run: --reshard changes only the data-parallel size" \
        in str(refused.value)
    assert "global batch 8 rows in the checkpoint (micro-batch 2 x accumulation 2 x 2 data-parallel ranks), 4 in " \
           "this run (2 x 2 x 1)" in str(refused.value)


def test_resume_at_another_size_is_refused_by_name(dp2_run):
    """Without --reshard the error says to add it; with it, another tensor-parallel size (and here with it another
    global batch) is refused naming both (gloo ranks reading the real DP=2 checkpoint)."""
    for world_size in (1, 2):
        run_distributed(body_refusals, world_size, str(dp2_run / "checkpoints"))


# ---- units --------------------------------------------------------------------------------------------

def layout(dp: int, micro: int, accumulation: int, tp: int = 1, seq_len: int = 64) -> dict:
    return {"world_size": dp * tp, "tensor_parallel": tp, "micro_batch": micro, "accumulation": accumulation,
            "seq_len": seq_len}


@pytest.mark.parametrize("old, new", [((2, 2, 2), (4, 2, 1)), ((2, 2, 2), (1, 2, 4)), ((4, 1, 3), (3, 2, 2)),
                                      ((1, 4, 3), (6, 2, 1))])
def test_resharded_sampler_continues_the_global_order(old, new):
    """After k steps at the old layout, the converted sampler states give every new rank the rows a run at the new
    layout from the start would give it at step k + 1 (20 rows: one or two steps an epoch, so k crosses epochs)."""
    rows = 20
    for k in (1, 2, 3):
        saved = layout(*old)
        before = ShardedSampler(rows, 0, old[0], seed=3, micro_batch_size=old[1], accumulation_steps=old[2])
        list(itertools.islice(iter(before), k * old[1] * old[2]))
        for rank in range(new[0]):
            per_step = new[1] * new[2]
            fresh = ShardedSampler(rows, rank, new[0], seed=3, micro_batch_size=new[1], accumulation_steps=new[2])
            expected = list(itertools.islice(iter(fresh), (k + 1) * per_step))[k * per_step:]
            resumed = ShardedSampler(rows, rank, new[0], seed=3, micro_batch_size=new[1], accumulation_steps=new[2])
            resumed.load_state_dict(resharded_sampler_state(before.state_dict(), saved, layout(*new)))
            assert list(itertools.islice(iter(resumed), per_step)) == expected, (k, rank)


def test_reshard_layout_checks():
    check_reshard_layout(layout(2, 2, 2), layout(4, 1, 2))  # the global batch of 8 rows, split otherwise
    with pytest.raises(ValueError, match=r"--seq_len 64 in the checkpoint, 128 in this run"):
        check_reshard_layout(layout(2, 2, 2), layout(2, 2, 2, seq_len=128))
    with pytest.raises(ValueError, match=r"global batch 8 rows .* 16 in this run \(2 x 2 x 4\): set "
                                         r"train_micro_batch_size_per_gpu and gradient_accumulation_steps in "
                                         r"--deepspeed_config so that their product is 2 at 4 data-parallel ranks"):
        check_reshard_layout(layout(2, 2, 2), layout(4, 2, 2))
