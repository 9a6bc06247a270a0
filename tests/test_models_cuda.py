"""The fast models on CUDA (C++/CUDA pooling op + Triton kernels) against the reference on CUDA.
Run by benchmarks/gpu_check.sh on a GPU machine; skipped without CUDA."""
from __future__ import annotations

import random

import pytest
import torch

from test_model_parity import MODELS, assert_same_gradients, build_pair, forward_backward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SEEDS = [random.randrange(2**31) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_fast_model_matches_reference(model, seed, mode, dtype):
    ref, fast, x = build_pair(model, seed, dtype=dtype)
    ref, fast = ref.cuda(), fast.cuda()
    x = {k: v.cuda() for k, v in x.items()}
    ref.train(mode == "train")
    fast.train(mode == "train")
    out_ref, grads_ref = forward_backward(ref, x)
    out_fast, grads_fast = forward_backward(fast, x)
    tight = dtype == torch.float64
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-9 if tight else 1e-4, atol=1e-11 if tight else 1e-5)
    assert_same_gradients(grads_fast, grads_ref, rtol=1e-8 if tight else 1e-3, scale_atol=1e-10 if tight else 1e-4)
