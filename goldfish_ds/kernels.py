"""Loads the compiled extension and declares its operators to torch.library.

The operators live under torch.ops.goldfish_ds (schemas in csrc/bindings.cpp). This module adds their
fake (meta) implementations so they trace under torch.compile, and reports what the build contains.
There is no Python fallback: without the extension, or with one compiled against another torch,
importing goldfish_ds fails with the fix.

Before the extension is loaded, the SIMD level it was built for (recorded in the file, see
csrc/bindings.cpp) is checked against the running CPU's /proc/cpuinfo flags: a build for AVX-512 on a CPU
without it gets an ImportError that says how to rebuild, not SIGILL (compiled code may execute AVX-512
instructions while it loads, so the check cannot wait for the import).
"""
from __future__ import annotations

import importlib.util
import mmap
from pathlib import Path
from typing import FrozenSet, List, Optional

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
# The /proc/cpuinfo flags each level needs: the instruction sets setup.py's CPU_FLAGS compile for.
CPU_CAPABILITY_FLAGS = {
    "AVX512_BF16": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx512_bf16"),
    "AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
    "AVX2": ("avx2", "fma", "f16c"),
    "DEFAULT": (),
}
_TAG = b"goldfish_ds.cpu_capability="


def built_cpu_capability(library: str) -> Optional[str]:
    """The SIMD level recorded in the compiled extension file `library`, read without loading it (None when the
    file carries no record: a build older than the record)."""
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(_TAG)
        if start < 0:
            return None
        start += len(_TAG)
        return data[start:data.find(b";", start)].decode("ascii")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[FrozenSet[str]]:
    """The feature flags of the running CPU from the first `flags` line of /proc/cpuinfo (None off Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def check_cpu_supports(capability: str, flags: FrozenSet[str]) -> None:
    """Raise ImportError, with the rebuild command, when a CPU with these flags cannot run a build for
    `capability` (a key of CPU_CAPABILITY_FLAGS)."""
    missing = [flag for flag in CPU_CAPABILITY_FLAGS[capability] if flag not in flags]
    if missing:
        best = next(level for level, needed in CPU_CAPABILITY_FLAGS.items() if flags.issuperset(needed))
        raise ImportError(
            f"goldfish_ds: the compiled extension goldfish_ds._C was built for the SIMD level {capability}, which "
            f"this CPU lacks (no {', '.join(missing)} in /proc/cpuinfo); loading it would crash with an illegal "
            f"instruction. Rebuild it on this machine: `GOLDFISH_CPU_CAPABILITY={best} pip install "
            "--no-build-isolation -e .` from the repository root (without GOLDFISH_CPU_CAPABILITY the build "
            "uses the level of the machine that builds)."
        )


def _check_extension_runs_here() -> None:
    spec = importlib.util.find_spec("goldfish_ds._C")
    flags = cpu_flags()
    if spec is None or spec.origin is None or flags is None:
        return  # no extension (the import below says so) or no /proc/cpuinfo to judge by
    capability = built_cpu_capability(spec.origin)
    if capability is not None:
        check_cpu_supports(capability, flags)


_check_extension_runs_here()
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
def _(labels, strategy, k, h, start_position, ignore_index, preceding, table_bits, exempt_ids, seed, step,
      boundary_id=None):
    return torch.empty_like(labels, dtype=torch.bool)


@torch.library.register_fake("goldfish_ds::apply_goldfish")
def _(labels, strategy, k, h, start_position, ignore_index, preceding, table_bits, exempt_ids, seed, step,
      boundary_id=None):
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


