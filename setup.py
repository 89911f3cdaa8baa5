"""Build the compiled extension `goldfish_ds._C` (the package's metadata is in pyproject.toml).

The extension is compiled against the torch of the environment goldfish_ds is installed into, and no other:
torch is not a build requirement, so pip's isolated build environment holds none and never downloads one.
pip runs this script with the interpreter of the environment being installed into, and its isolation only
takes that environment's site-packages off sys.path; this script puts them back at the end of sys.path
(after the isolated build tools) and imports torch from there. Without torch there the build stops with the
command to install it. The torch it compiled against is recorded in goldfish_ds/_build_info.py, and
goldfish_ds refuses to import with another one (goldfish_ds/kernels.py).

The CPU kernels are always built, for the SIMD level of the building machine (AVX512 with or without its
bf16 conversions, AVX2 or plain), as DeepSpeed builds its CPU optimizers. The CUDA kernels are added when
torch was built with CUDA, nvcc is found (CUDA_HOME) and the GPU architectures to compile for are known
(TORCH_CUDA_ARCH_LIST, or else the visible GPUs); otherwise the build is CPU-only and says why.
Environment overrides:
  GOLDFISH_CPU_CAPABILITY=AVX512_BF16|AVX512|AVX2|DEFAULT   SIMD level of the CPU kernels
  GOLDFISH_BUILD_CUDA=0|1                                   force the CUDA kernels off / on
"""
import glob
import os
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"]
CPU_FLAGS = {
    "AVX512_BF16": AVX512_FLAGS + ["-mavx512bf16"],
    "AVX512": AVX512_FLAGS,
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}
BUILD_INFO = "_build_info.py"  # written next to the compiled extension


def import_environment_torch():
    """The torch installed in the environment being installed into, even from inside pip's build isolation."""
    try:
        import torch  # --no-build-isolation, or a plain `python setup.py build_ext`: the environment's own
    except ImportError:
        paths = sysconfig.get_paths()
        site_packages = list(dict.fromkeys([paths["purelib"], paths["platlib"]]))
        sys.path.extend(path for path in site_packages if path not in sys.path)
        try:
            import torch
        except ImportError:
            raise SystemExit(
                f"goldfish_ds: the extension is compiled against the torch of the environment it is installed "
                f"into, and {' or '.join(site_packages)} holds none (interpreter {sys.executable}). Install torch "
                "there first (`pip install -r requirements.txt`, or your CUDA build of torch), then install "
                "goldfish_ds again. With pip's venv-isolation feature the environment is out of sight: use "
                "`pip install --no-build-isolation ...` then."
            ) from None
    return torch


torch = import_environment_torch()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cpu_capability() -> str:
    requested = os.environ.get("GOLDFISH_CPU_CAPABILITY")
    if requested:
        if requested not in CPU_FLAGS:
            raise SystemExit(f"GOLDFISH_CPU_CAPABILITY must be one of {sorted(CPU_FLAGS)}, got {requested!r}")
        return requested
    detected = torch.backends.cpu.get_cpu_capability()  # what this machine's torch dispatches to
    if detected.startswith("AVX512"):
        bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()  # a private torch helper
        return "AVX512_BF16" if bf16 else "AVX512"
    return "AVX2" if detected == "AVX2" else "DEFAULT"


def build_cuda() -> bool:
    """Whether to compile the CUDA kernels; torch's CUDAExtension needs target architectures to do so."""
    requested = os.environ.get("GOLDFISH_BUILD_CUDA")
    if requested not in (None, "0", "1"):
        raise SystemExit(f"GOLDFISH_BUILD_CUDA must be 0 or 1, got {requested!r}")
    arch_known = bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or torch.cuda.is_available()
    if requested == "1":
        if torch.version.cuda is None or CUDA_HOME is None:
            raise SystemExit(f"GOLDFISH_BUILD_CUDA=1 needs a CUDA build of torch (this is {torch.__version__}) "
                             f"and nvcc (CUDA_HOME: {CUDA_HOME})")
        if not arch_known:
            raise SystemExit("GOLDFISH_BUILD_CUDA=1: no GPU is visible to read the architectures from; set "
                             "TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'")
        return True
    if requested == "0":
        return False
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} has no CUDA"
    elif CUDA_HOME is None:
        reason = f"torch {torch.__version__} has CUDA, but nvcc was not found (set CUDA_HOME)"
    elif not arch_known:
        reason = (f"torch {torch.__version__} has CUDA, but no GPU is visible and TORCH_CUDA_ARCH_LIST is not set "
                  "(e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0' builds the CUDA kernels for those GPUs)")
    else:
        return True
    print(f"goldfish_ds: building the CPU kernels only: {reason}", file=sys.stderr)
    return False


def extension():
    capability = cpu_capability()
    # -fopenmp: at::parallel_for is a header template that is only parallel where OpenMP is enabled.
    # CPU_CAPABILITY names the at::vec implementation (AVX512 for both AVX512 levels).
    vec = capability.split("_")[0]
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-DCPU_CAPABILITY={vec}",
           f'-DGOLDFISH_CPU_CAPABILITY="{capability}"']
    cxx += CPU_FLAGS[capability]
    sources = ["csrc/bindings.cpp", "csrc/mask_cpu.cpp", "csrc/cross_entropy_cpu.cpp"]
    if not build_cuda():
        return CppExtension("goldfish_ds._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    sources += ["csrc/bindings_cuda.cpp"] + sorted(glob.glob("csrc/*.cu"))
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    return CUDAExtension(
        "goldfish_ds._C",
        sources,
        define_macros=[("GOLDFISH_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


class BuildExtensionRecordingTorch(BuildExtension):
    """torch's BuildExtension, then goldfish_ds/_build_info.py next to the extension: the torch compiled against."""

    def run(self) -> None:
        super().run()
        # In place (`build_ext --inplace`, `pip install -e .`) beside the sources, else in the build tree (wheels).
        info = Path(self.get_ext_fullpath("goldfish_ds._C")).with_name(BUILD_INFO)
        info.write_text(
            '"""Written by setup.py: the torch that goldfish_ds._C was compiled against."""\n'
            f"TORCH_VERSION = {str(torch.__version__)!r}\n"
            f"TORCH_PATH = {os.path.dirname(torch.__file__)!r}\n"
        )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtensionRecordingTorch})
