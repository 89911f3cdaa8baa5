"""The build: the compiled extension is what runs, and the command reports it."""
import subprocess
import sys

import torch

import goldfish_ds
from conftest import HAS_CUDA


def test_compiled_kernels_present():
    assert "cpu" in goldfish_ds.compiled_backends()
    assert goldfish_ds.cpu_capability() in {"AVX512_BF16", "AVX512", "AVX2", "DEFAULT"}
    if HAS_CUDA:  # a GPU machine must run the CUDA kernels, never skip them
        assert "cuda" in goldfish_ds.compiled_backends()


def test_operators_registered():
    for name in ["goldfish_mask", "cross_entropy_loss", "cross_entropy_loss_grad", "cross_entropy_loss_grad_",
                 "scale_rows_"]:
        assert hasattr(torch.ops.goldfish_ds, name)


def test_info_command_reports_kernels():
    out = subprocess.run([sys.executable, "-m", "goldfish_ds", "info"], check=True, capture_output=True, text=True)
    assert "compiled kernels: cpu" in out.stdout
