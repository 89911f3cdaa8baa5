"""The distributed checks on ranks started by real launchers: Open MPI's mpirun and torchrun."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import free_port
from test_models_llama import hf_checkpoint

BIN = Path(sys.executable).parent
CHECKS = str(Path(__file__).parent / "launched_checks.py")


def run_launcher(command, np):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("all checks passed") == np


def launcher(name):
    path = shutil.which(name) or str(BIN / name)
    if not Path(path).exists():
        pytest.fail(f"{name} not found: install the requirements (pip install -r requirements.txt)")
    return path


@pytest.mark.parametrize("np", [2, 4])
def test_distributed_checks_under_mpirun(tmp_path, np):
    checkpoint = hf_checkpoint(tmp_path / "hf", tied=True, vocab=301, kv_heads=4)
    # slot:OVERSUBSCRIBE keeps local ranks in rank order when ranks outnumber cores (see DESIGN_NOTES).
    run_launcher([launcher("mpirun"), "-np", str(np), "--map-by", "slot:OVERSUBSCRIBE", sys.executable, CHECKS,
                  "mpirun", str(checkpoint)], np)


def test_distributed_checks_under_torchrun(tmp_path):
    checkpoint = hf_checkpoint(tmp_path / "hf", tied=False, vocab=301, kv_heads=4)
    run_launcher([launcher("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), CHECKS, "torchrun/deepspeed",
                  str(checkpoint)], 2)
