#!/usr/bin/env bash
# One GPU session: rebuild the extension for this machine's torch/CUDA, run the pooled-embedding
# and Triton kernel tests on CUDA, then the timings table (kernels and whole models).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" python -m pip install -q --no-build-isolation --no-deps -e .
python -m pytest -q -p no:cacheprovider tests/test_pooled_embedding.py tests/test_models_cuda.py -k "cuda" || echo "CUDA tests FAILED (pooled embedding / models)"
exec python benchmarks/gpu_check.py "$@"
