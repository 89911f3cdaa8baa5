"""Build goldfish_ds and its compiled extension `goldfish_ds._C`.

The CPU kernels are always built, for the SIMD level of the building machine (AVX512 with or without its
bf16 conversions, AVX2 or plain), as DeepSpeed builds its CPU optimizers. The CUDA kernels are added when
torch was built with CUDA and nvcc is found (CUDA_HOME). Environment overrides:
  GOLDFISH_CPU_CAPABILITY=AVX512_BF16|AVX512|AVX2|DEFAULT   SIMD level of the CPU kernels
  GOLDFISH_BUILD_CUDA=0|1                                   force the CUDA kernels off / on
Install with `pip install --no-build-isolation -e .` so the extension is built against the installed torch.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"]
CPU_FLAGS = {
    "AVX512_BF16": AVX512_FLAGS + ["-mavx512bf16"],
    "AVX512": AVX512_FLAGS,
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}


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
    requested = os.environ.get("GOLDFISH_BUILD_CUDA")
    if requested is not None:
        return requested == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


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


setup(
    name="goldfish_ds",
    version="0.1.0",
    description="Goldfish loss (arXiv 2406.10209) for DeepSpeed / Megatron-style LLM pretraining",
    packages=find_packages(include=["goldfish_ds", "goldfish_ds.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["goldfish_ds=goldfish_ds.__main__:main"]},
)
