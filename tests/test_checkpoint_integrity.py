"""Checkpoint integrity and failed saves, with real damaged files and a real full disk: the manifest of sizes and
sha256, what --resume, --verify_checkpoint and --resume_from do with a truncated, altered or missing file, a save
that runs out of space on a tmpfs mounted for the test, and a metrics.jsonl whose last line a crash tore."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from safetensors import safe_open
from test_training import corpus, ds_config, launch, losses, records, train_args  # noqa: F401 (corpus: a fixture)

from goldfish_ds.training.metrics import MetricsLogger

STEPS = 6  # checkpoints at steps 3 and 6
TIMEOUT = 600  # --dist_timeout of the full-disk run: a rank left waiting in a collective would wait this long


def job_args(corpus: Path, out: Path, *extra: str) -> list:
    """2 data-parallel ranks, micro-batch 2: 6 steps, a checkpoint every 3."""
    return train_args(corpus, out, ds_config(out.parent / f"{out.name}.ds.json", 2, 1), "--max_steps", str(STEPS),
                      "--save_interval", "3", "--eval_interval", "0", *extra)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run every resumed one must reproduce; its checkpoints are the ones damaged below."""
    out = tmp_path_factory.mktemp("reference") / "run"
    launch("torchrun", 2, job_args(corpus, out))
    return out


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def optimizer_shard(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def flip_byte(path: Path) -> None:
    """Invert one byte in the middle of the file (inside the tensor data), keeping its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_continues_exactly(out: Path, reference: Path) -> None:
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert losses(out).tolist() == losses(reference).tolist()


# ---- what a checkpoint holds ---------------------------------------------------------------------------------

def test_manifest_lists_every_file_and_our_state_is_json_and_safetensors(reference):
    from goldfish_ds.training.checkpoint_engine import DEEPSPEED_SAFE_GLOBALS

    root = reference / "checkpoints"
    assert (root / "latest").read_text() == "step_00000006"
    for step in (3, 6):
        checkpoint = root / f"step_{step:08d}"
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert manifest["tag"] == checkpoint.name
        on_disk = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                   for p in checkpoint.iterdir() if p.name != "manifest.json"}
        assert manifest["files"] == on_disk
        assert set(on_disk) == {"client_state.json", "rank_00000.safetensors", "rank_00001.safetensors",
                                *(f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1)
                                  for kind in ("model", "optim"))}
        client = json.loads((checkpoint / "client_state.json").read_text())
        assert client["step"] == step and client["layout"]["world_size"] == 2
        for rank in (0, 1):
            with safe_open(str(checkpoint / f"rank_{rank:05d}.safetensors"), framework="pt") as f:
                assert json.loads(f.metadata()["state"])["world_size"] == 2
                assert f.get_tensor("torch").dtype == torch.uint8 and f.get_tensor("numpy").numel() == 624
        # DeepSpeed's pickles need the allow-list (fp16's DynamicLossScaler aside), and hold no state of ours.
        for path in checkpoint.glob("*.pt"):
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
            expected = set() if "model_states" in path.name else {
                "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum"}
            assert unsafe == expected, path.name
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            model_states = torch.load(checkpoint / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)
        assert "step" not in model_states and "sampler" not in model_states


# ---- verification on 2 real ranks (each checks half of the files) -----------------------------------------------

def body_verify(rank: int, world_size: int, root: str) -> None:
    from goldfish_ds.training.checkpoint import CheckpointError, CheckpointManager

    manager = CheckpointManager(root, keep=2)
    six, three = Path(root) / "step_00000006", Path(root) / "step_00000003"
    assert manager.verify("step_00000006", hashes=True) is None
    assert manager.resume_tag(None, verify_hashes=True) == "step_00000006"
    assert manager.resume_tag("step_00000003", verify_hashes=True) == "step_00000003"
    # An altered byte keeps the size: only the hashes see it (rank 1 checks this file).
    flipped = six / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if rank == 0:
        flip_byte(flipped)
    torch.distributed.barrier()
    assert manager.verify("step_00000006", hashes=False) is None
    assert manager.verify("step_00000006", hashes=True) == \
        f"{flipped} does not have the sha256 of its manifest (its contents changed after the save)"
    # A truncated shard and a missing file are seen by the sizes.
    truncated, missing = optimizer_shard(three, 0), three / "rank_00001.safetensors"
    size = truncated.stat().st_size
    torch.distributed.barrier()
    if rank == 0:
        os.truncate(truncated, size // 3)
    torch.distributed.barrier()
    assert manager.verify("step_00000003", hashes=False) == \
        f"{truncated} has {size // 3} bytes, its manifest says {size} (truncated or overwritten)"
    if rank == 0:
        missing.unlink()
        os.truncate(truncated, size)  # the size is right again; the missing file remains
    torch.distributed.barrier()
    assert manager.verify("step_00000003", hashes=False) == f"{missing} is missing"
    # --resume with no valid checkpoint left, --resume_from an absent tag.
    with pytest.raises(CheckpointError) as e:
        manager.resume_tag(None, verify_hashes=True)
    assert str(e.value) == (f"--resume: no valid checkpoint in {root}\n  {six}: {flipped} does not have the sha256 "
                            f"of its manifest (its contents changed after the save)\n  {three}: {missing} is missing")
    with pytest.raises(CheckpointError, match=r"--resume_from step_00000009: no such checkpoint in .*; the complete "
                                              r"ones are: step_00000006, step_00000003$"):
        manager.resume_tag("step_00000009", verify_hashes=False)
    with pytest.raises(CheckpointError, match=r"--resume_from step_00000003: the checkpoint is damaged: .* missing"):
        manager.resume_tag("step_00000003", verify_hashes=False)


def test_verify_names_a_truncated_an_altered_and_a_missing_file(reference, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    run_distributed(body_verify, 2, str(root))


# ---- resuming from damaged checkpoints ------------------------------------------------------------------------

def test_resume_skips_an_altered_newest_checkpoint_and_drops_a_torn_metrics_line(corpus, reference, tmp_path):
    """One byte of step 6's optimizer shard of rank 1 is inverted and metrics.jsonl ends in half a record:
    --resume --verify_checkpoint says it skips step 6 and why, drops the torn line with a warning, and continues
    from step 3 exactly. (The size check alone passes such a file: see
    test_verify_names_a_truncated_an_altered_and_a_missing_file.)"""
    out = copy_run(reference, tmp_path)
    shard = optimizer_shard(out / "checkpoints" / "step_00000006", 1)
    flip_byte(shard)
    metrics = out / "metrics.jsonl"
    torn = metrics.read_text().splitlines()[-1][:40]
    metrics.write_text(metrics.read_text() + torn)
    result = launch("torchrun", 2, job_args(corpus, out, "--resume", "--verify_checkpoint"))
    assert (f"--resume: skipped damaged checkpoint {shard.parent}: {shard} does not have the sha256 of its manifest "
            f"(its contents changed after the save)") in result.stderr
    assert f"{metrics}: dropped its last line, cut short by an interrupted write: {torn!r}" in result.stderr
    assert_continues_exactly(out, reference)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert json.loads((shard.parent / "manifest.json").read_text())["files"][shard.name]["sha256"] == \
        hashlib.sha256(shard.read_bytes()).hexdigest()  # written again


# ---- a full disk ------------------------------------------------------------------------------------------------

def test_full_disk_during_a_save_stops_every_rank_and_keeps_the_latest_checkpoint(corpus, reference, tmp_path):
    """out_dir on a tmpfs with room for the step-3 checkpoint and half of the step-6 one: the save runs out of
    space; every rank stops (long before --dist_timeout) with ENOSPC and the path, the partial directory is
    removed, `latest` still names step 3; with more space, --resume continues exactly."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    checkpoint = sum(p.stat().st_size for p in (reference / "checkpoints" / "step_00000003").iterdir())
    others = sum(p.stat().st_size for p in (reference / "checkpoints").iterdir() if p.is_file())  # recovery scripts
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={others + checkpoint * 3 // 2}", "tmpfs", str(disk)],
                   check=True)
    try:
        out = disk / "run"
        args = job_args(corpus, out, "--dist_timeout", str(TIMEOUT))
        start = time.monotonic()
        failed = launch("torchrun", 2, args, expect_ok=False)
        elapsed = time.monotonic() - start
        assert failed.returncode != 0 and elapsed < TIMEOUT / 3, (failed.returncode, elapsed)
        partial = out / "checkpoints" / "step_00000006.partial"
        assert f"pretrain.py: error: checkpoint {partial} was not written: rank " in failed.stderr
        assert "ENOSPC (No space left on device)" in failed.stderr
        assert "the latest complete checkpoint is still step_00000003" in failed.stderr
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003"]
        assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
        subprocess.run(["mount", "-o", "remount,size=256M", str(disk)], check=True)
        launch("torchrun", 2, args + ["--resume"])
        assert_continues_exactly(out, reference)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- metrics.jsonl ----------------------------------------------------------------------------------------------

def test_torn_last_metrics_line_is_dropped_and_a_damaged_earlier_one_is_an_error(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + lines[-1][:17])  # the crash came while step 4's record was written
    MetricsLogger(str(tmp_path), enabled=True, start_step=2, max_steps=9, progress=False).close()
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert f"{path}: dropped its last line, cut short by an interrupted write: {lines[-1][:17]!r}" in \
        capsys.readouterr().err
    path.write_text(lines[0] + "\n" + lines[1][:17] + "\n" + lines[2] + "\n")
    damaged = re.escape(repr(lines[1][:17]))
    with pytest.raises(ValueError, match=rf"metrics.jsonl: record 2 of 3 is not JSON \(.*\): {damaged}$"):
        MetricsLogger(str(tmp_path), enabled=True, start_step=3, max_steps=9, progress=False)


def test_fp16_loss_scaler_loads_with_weights_only():
    """fp16 runs (GPU only) pickle a DynamicLossScaler into their optimizer states: it is on the allow-list."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    from goldfish_ds.training.checkpoint_engine import DEEPSPEED_SAFE_GLOBALS

    scaler = CreateLossScaler(torch.half, 0, True, {"init_scale": 2**16, "scale_window": 1000, "min_scale": 1,
                                                    "delayed_shift": 2, "consecutive_hysteresis": False})
    buffer = io.BytesIO()
    torch.save({"loss_scaler": scaler}, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        loaded = torch.load(buffer, weights_only=True)["loss_scaler"]
    assert type(loaded) is type(scaler) and vars(loaded) == vars(scaler)


def test_verify_checkpoint_goes_with_resume_from():
    """(Without a resume it is refused: tests/test_bad_input.py.)"""
    from goldfish_ds.training import parse_args

    assert parse_args(["--resume_from", "step_00000003", "--verify_checkpoint"]).verify_checkpoint
