#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the extension with its CUDA kernels, run the GPU tests and the
# benchmarks. Logs go to $OUT (if set) as well as the console.
set -uo pipefail
cd "$(dirname "$0")/.."
# build_ext --inplace builds next to the sources without installing: PYTHONPATH makes the package importable.
export GOLDFISH_BUILD_CUDA=1 PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
log="${OUT:-/tmp}/gpu_checks.log"
status=0
{
  python3 setup.py build_ext --inplace > "${OUT:-/tmp}/build.log" 2>&1 || { tail -50 "${OUT:-/tmp}/build.log"; exit 1; }
  python3 -m goldfish_ds info
  python3 -m pytest -q -m gpu tests/ -p no:cacheprovider || status=1
  python3 -m pytest -q tests/test_kernels.py -p no:cacheprovider || status=1
  python3 benchmarks/bench_loss.py --device cuda --repeats 20 --cases 4096x32000:fp32 4096x32000:bf16 \
    8192x32000:fp32 8192x32000:bf16 2048x128256:fp32 2048x128256:bf16 || status=1
  python3 benchmarks/bench_mask.py --device cuda --repeats 20 --batch 64x8192 || status=1
  python3 benchmarks/bench_linear_loss.py --device cuda --repeats 10 || status=1
  exit $status
} 2>&1 | tee "$log"
