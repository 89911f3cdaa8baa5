"""Loads the compiled extension and declares its operators to torch.library.

The operators live under torch.ops.goldfish_ds (schemas in csrc/bindings.cpp). This module adds their
fake (meta) implementations so they trace under torch.compile, and reports what the build contains.
There is no Python fallback: without the extension, or with one compiled against another torch,
importing goldfish_ds fails with the fix.
"""
from __future__ import annotations

from typing import List

import torch

_REBUILD = ("Build it against the torch you run with: `pip install -e .` from the repository root (or "
            "reinstall goldfish_ds from its source).")

try:  # setup.py records the torch it compiled against: a C++ extension only works with that one
    from goldfish_ds._build_info import TORCH_PATH, TORCH_VERSION
except ImportError:
    raise ImportError("goldfish_ds: the compiled extension goldfish_ds._C is not built (goldfish_ds/_build_info.py "
                      f"is missing). {_REBUILD}") from None
if TORCH_VERSION != torch.__version__:
    raise ImportError(f"goldfish_ds: the compiled extension goldfish_ds._C was built against torch {TORCH_VERSION} "
                      f"({TORCH_PATH}), but this is torch {torch.__version__} ({torch.__path__[0]}). {_REBUILD}")
try:
    from goldfish_ds import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"goldfish_ds: the compiled extension goldfish_ds._C is missing or does not load ({error}). {_REBUILD}"
    ) from error

ops = torch.ops.goldfish_ds
_BACKENDS = tuple(_C.compiled_backends())


def compiled_backends() -> List[str]:
    """Devices whose kernels this build contains, e.g. ["cpu"] or ["cpu", "cuda"]."""
    return list(_BACKENDS)


def cpu_capability() -> str:
    """SIMD level the CPU kernels were compiled for (AVX512_BF16, AVX512, AVX2 or DEFAULT)."""
    return _C.cpu_capability()


def check_device_supported(device: torch.device) -> None:
    """Raise a clear error when this build has no kernels for `device`."""
    if device.type not in _BACKENDS:
        raise RuntimeError(
            f"goldfish_ds: this build has kernels for {compiled_backends()}, not for {device.type!r} tensors. "
            "Rebuild on a machine with a CUDA build of torch and nvcc (pip install -e .)."
        )


@torch.library.register_fake("goldfish_ds::goldfish_mask")
def _(labels, strategy, k, h, start_position, ignore_index, preceding, table_bits, exempt_ids, seed, step):
    return torch.empty_like(labels, dtype=torch.bool)


@torch.library.register_fake("goldfish_ds::apply_goldfish")
def _(labels, strategy, k, h, start_position, ignore_index, preceding, table_bits, exempt_ids, seed, step):
    return torch.empty_like(labels)


@torch.library.register_fake("goldfish_ds::cross_entropy_loss")
def _(logits, labels, dropped, ignore_index, dropped_loss):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.register_fake("goldfish_ds::cross_entropy_loss_grad")
def _(logits, labels, dropped, ignore_index, dropped_loss, grad_scale):
    return logits.new_empty(logits.shape[0], dtype=torch.float32), torch.empty_like(logits)


@torch.library.register_fake("goldfish_ds::cross_entropy_loss_grad_")
def _(logits, labels, dropped, ignore_index, dropped_loss, grad_scale):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.register_fake("goldfish_ds::scale_rows_")
def _(grad, scale):
    return None


@torch.library.register_fake("goldfish_ds::vocab_parallel_stats")
def _(logits, local_labels, skip):
    return logits.new_empty(logits.shape[0], dtype=torch.float32), logits.new_empty(logits.shape[0],
                                                                                    dtype=torch.float32)


@torch.library.register_fake("goldfish_ds::vocab_parallel_grad")
def _(logits, local_labels, skip, lse, grad_scale):
    return torch.empty_like(logits)


@torch.library.register_fake("goldfish_ds::vocab_parallel_grad_")
def _(logits, local_labels, skip, lse, grad_scale):
    return None


