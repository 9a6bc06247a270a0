"""The fast models through the Triton kernels (interpreter on CPU) against the reference."""
from __future__ import annotations

import random

import pytest
import torch

import nextrec_fast
from nextrec_fast.ops import triton_ops
from test_model_parity import MODELS, assert_same_gradients, build_pair, forward_backward, rounding_spread

pytestmark = pytest.mark.skipif(not triton_ops.is_available("cpu"),
                                reason="Triton interpreter unavailable (needs triton and TRITON_INTERPRET=1)")
SEEDS = [random.randrange(2**31) for _ in range(2)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_triton_path_matches_reference(model, seed, mode):
    ref, fast, x = build_pair(model, seed)
    ref.train(mode == "train")
    fast.train(mode == "train")
    out_ref, grads_ref = forward_backward(ref, x)
    with nextrec_fast.use_backend("triton"):
        out_fast, grads_fast = forward_backward(fast, x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-9, atol=1e-11)
    assert_same_gradients(grads_fast, grads_ref, rtol=1e-8, scale_atol=1e-10, spread=rounding_spread(ref, x, grads_ref))
    for (name, b_ref), (_, b_fast) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_triton_backend_is_used(monkeypatch):
    """Guard against the test above silently running the PyTorch path."""
    calls = []
    original = triton_ops.expert_layer
    monkeypatch.setattr(triton_ops, "expert_layer", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, fast, x = build_pair("mmoe", 1)
    with nextrec_fast.use_backend("triton"):
        fast(x)
    assert calls
