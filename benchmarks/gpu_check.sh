#!/usr/bin/env bash
# GPU check of the Triton kernels (tests on CUDA, matmul peak, expert_layer / gate_mixture timings).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
exec python benchmarks/gpu_check.py "$@"
