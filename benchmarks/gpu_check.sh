#!/usr/bin/env bash
# One GPU session: rebuild the extension for this machine's torch/CUDA, run the pooled-embedding
# and Triton kernel tests on CUDA, then the timings table (kernels and whole models), then the
# pooling op's table.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" python -m pip install -q --no-build-isolation --no-deps -e .
python -m pytest -q -p no:cacheprovider tests/test_pooled_embedding.py tests/test_models_cuda.py tests/test_optim.py -k "cuda" || echo "CUDA tests FAILED (pooled embedding / models / in-backward optimisers)"
status=0
python benchmarks/gpu_check.py "$@" || status=$?
# Pooling op (issue target: forward at >= 60% of the device-to-device copy bandwidth); batch 65536
# too, where launches and the id-check sync no longer dominate.
echo "== pooled_embedding on CUDA: nextrec-style vs op (checked / unchecked ids) vs embedding_bag"
python benchmarks/bench_pooled_embedding.py --device cuda --batches 8192 65536 --repeats 7 || status=$?
# Pooling + backward + table update with the optimiser in the backward, against dense gradients
# (and FBGEMM's TBE where a CUDA fbgemm-gpu is installed).
echo "== tables updated in the backward on CUDA"
python -m nextrec_fast.bench.tbe_update --device cuda --repeats 7 || status=$?
exit "$status"
