"""Preemption (goldfish_ds/training/preemption.py): a real SIGTERM or SIGUSR1 to one rank, or to the launcher,
stops every rank after the same optimizer step with a checkpoint and exit status 75; --resume then trains to
the end and the loss curve and the final checkpoint equal the uninterrupted run's exactly. The signals come from
the GOLDFISH_DS_CRASH fault hook (goldfish_ds/training/faults.py) at a known step, or from the test once the hook
says rank 0 holds after a known step."""
from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_training import (  # noqa: F401 (corpus and dp2_run are fixtures)
    STEPS,
    corpus,
    dp2_run,
    ds_config,
    launch,
    launch_command,
    launch_env,
    losses,
    records,
    train_args,
)

from goldfish_ds.training.preemption import PREEMPTED_EXIT_STATUS


def checkpoint_tensors(step_dir: Path) -> dict:
    """Every tensor of DeepSpeed's files of a checkpoint directory (model and optimizer partitions, client state),
    by file and key path. Not rank_*.pt: torch's global generator saved there is seeded from entropy in every
    process (and unused by training), so it differs between any two runs."""
    found = {}

    def walk(value, key):
        if torch.is_tensor(value):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")

    for path in sorted(set(step_dir.glob("*.pt")) - set(step_dir.glob("rank_*.pt"))):
        walk(torch.load(path, weights_only=False, map_location="cpu"), path.name)
    return found


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def assert_stopped_at(out: Path, output: str, step: int, reason: str) -> None:
    """The job stopped after `step` for `reason`, with that step's checkpoint complete and the latest."""
    assert f"step {step}: stopped by {reason}; continue with --resume" in output, output[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{step:08d}"
    assert not list(checkpoints.glob("*.partial"))
    assert records(out)[-1]["step"] == step


def assert_same_run(out: Path, reference: Path) -> None:
    """The curves, validation losses and final checkpoints (every model and optimizer tensor) are the reference's."""
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert losses(out).tolist() == losses(reference).tolist()
    assert records(out, "val") == records(reference, "val")
    final = f"step_{STEPS:08d}"
    assert_same_checkpoint(out / "checkpoints" / final, reference / "checkpoints" / final)


def test_signals_to_one_rank_stop_all_and_resume_exactly(corpus, dp2_run, tmp_path):
    """One 2-rank job (deepspeed launcher), preempted three times and resumed each time: SIGTERM to rank 1 after
    step 7; SIGTERM to rank 0 during the step-10 validation (the step-10 checkpoint is written once, then the job
    exits); SIGUSR1 to rank 1 while it writes the step-15 checkpoint (the save completes). Each time both ranks
    stop after that step with exit status 75 (the launcher passes it on)."""
    out = tmp_path / "run"
    args = train_args(corpus, out, ds_config(tmp_path / "ds.json", 2, 1))
    for fault, step, reason in (("step:7:1:TERM", 7, "SIGTERM"), ("validation:10:0:TERM", 10, "SIGTERM"),
                                ("checkpoint:15:1:USR1", 15, "SIGUSR1")):
        stopped = launch("deepspeed", 2, args + (["--resume"] if step > 7 else []), expect_ok=False,
                         env={"GOLDFISH_DS_CRASH": fault})
        assert stopped.returncode == PREEMPTED_EXIT_STATUS, stopped.stdout[-3000:] + stopped.stderr[-3000:]
        assert_stopped_at(out, stopped.stdout + stopped.stderr, step, reason)
    assert stopped.stdout.count("step 15: checkpoint") == 1
    launch("torchrun", 2, args + ["--resume"])
    assert_same_run(out, dp2_run)


def signal_launcher_when_held(kind: str, args: list, held: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start the job under `kind` with rank 0 holding after a step (a "hold" fault naming `held`); when it holds,
    send `sig` to the launcher: torchrun's agent, mpirun, or deepspeed's per-node `deepspeed.launcher.launch`
    (the `deepspeed` command's child). Returns the exit status and the output."""
    job = subprocess.Popen(launch_command(kind, 2) + args, env=launch_env(2), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not held.exists():
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:]
            time.sleep(0.05)
        target = psutil.Process(job.pid)
        if kind == "deepspeed":
            target = next(p for p in target.children() if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        target.send_signal(sig)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    return job.returncode, output


def test_signals_to_the_launcher_stop_all_and_resume_exactly(corpus, dp2_run, tmp_path, monkeypatch):
    """SIGTERM to torchrun when rank 0 has finished step 7, SIGTERM to deepspeed's launch.py at step 12, SIGUSR1 to
    mpirun at step 16: each forwards it to the ranks, which stop after that step; then --resume to the end."""
    out = tmp_path / "run"
    args = train_args(corpus, out, ds_config(tmp_path / "ds.json", 2, 1))
    for kind, step, sig, status in (("torchrun", 7, signal.SIGTERM, 1), ("deepspeed", 12, signal.SIGTERM, 1),
                                    ("mpirun", 16, signal.SIGUSR1, PREEMPTED_EXIT_STATUS)):
        held = tmp_path / f"held_{step}"
        monkeypatch.setenv("GOLDFISH_DS_CRASH", f"hold:{step}:0:{held}")
        returncode, output = signal_launcher_when_held(kind, args + (["--resume"] if step > 7 else []), held, sig)
        assert returncode == status, output[-3000:]  # torchrun and launch.py report their own signal as a failure
        assert_stopped_at(out, output, step, sig.name)
    monkeypatch.delenv("GOLDFISH_DS_CRASH")
    launch("torchrun", 2, args + ["--resume"])
    assert_same_run(out, dp2_run)


def test_exit_after_minutes(corpus, tmp_path):
    """A budget already spent when training starts: rank 0's clock stops the job after its first step."""
    out = tmp_path / "run"
    args = train_args(corpus, out, ds_config(tmp_path / "ds.json", 2, 1), "--exit_after_minutes", "1e-6")
    stopped = launch("python", 1, args, expect_ok=False)
    assert stopped.returncode == PREEMPTED_EXIT_STATUS, stopped.stderr[-3000:]
    assert "step 1: stopped by exit_after_minutes" in stopped.stdout + stopped.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"


def test_a_malformed_fault_is_an_error(monkeypatch):
    from goldfish_ds.training.faults import maybe_crash

    monkeypatch.setenv("GOLDFISH_DS_CRASH", "step:7")
    message = "GOLDFISH_DS_CRASH: 'step:7' is not <point>:<steps>:<rank>[:<arg>]"
    with pytest.raises(ValueError, match=re.escape(message)):
        maybe_crash("step", 7)
