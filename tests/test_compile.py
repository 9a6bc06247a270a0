"""torch.compile(fullgraph=True) of the fast models: no graph breaks, same results as eager."""
from __future__ import annotations

import pytest
import torch

import nextrec_fast
from nextrec_fast.ops import triton_ops
from test_model_parity import MODELS, build_pair, forward_backward

BACKENDS = ["torch"] + (["triton"] if triton_ops.is_available("cpu") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", list(MODELS))
def test_compiled_fast_model_fullgraph(model, backend):
    ref, fast, x = build_pair(model, 7)
    ref.eval()
    fast.eval()
    with nextrec_fast.use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
        _, grads_ref = forward_backward(ref, x)
        out, grads = forward_backward(compiled, x)
    torch.testing.assert_close(out, ref(x).detach(), rtol=1e-9, atol=1e-11)
    for name, g in grads_ref.items():
        if g is not None:
            torch.testing.assert_close(grads["_orig_mod." + name], g, rtol=1e-8, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_compiled_with_inductor():
    _, fast, x = build_pair("mmoe", 3, dtype=torch.float32)
    fast.eval()
    with nextrec_fast.use_backend("torch"), torch.no_grad():
        torch._dynamo.reset()
        expected = fast(x)
        torch.testing.assert_close(torch.compile(fast, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-6)


def test_compiled_backward_reuses_table_gradient_buffers():
    """Under torch.compile the pooling backward still reuses the tables' gradient buffers (a
    fresh zeroed V x D gradient per table and step made the compiled model slower than eager),
    and the gradients equal the eager model's."""
    _, fast, x = build_pair("mmoe", 5, dtype=torch.float32)
    table = fast.embedding.embed_dict[next(iter(fast.embedding.embed_dict))].weight
    _, grads = forward_backward(fast, x)
    eager = {n: g.clone() for n, g in grads.items() if g is not None}
    del grads
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    storages = []
    for _ in range(3):
        _, grads = forward_backward(compiled, x)
        storages.append(table.grad.untyped_storage().data_ptr())
        for name, g in eager.items():
            torch.testing.assert_close(grads["_orig_mod." + name], g, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
        del grads  # holding last step's gradients would (rightly) prevent the reuse
    assert storages[1] == storages[2], "the compiled backward allocated a new table gradient every step"
