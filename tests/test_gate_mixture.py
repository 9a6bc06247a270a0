"""The C++ gate_mixture op (the gates' weighted sums of expert outputs, CPU) against float64.

Reference beside the test: ``torch.bmm(weights, experts)`` in float64 and its autograd gradients.
The op in float32 must be as close to that as float32 ``torch.bmm`` (what the models ran before),
forward and both gradients, on fresh random shapes and expert layouts.
"""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

from nextrec_fast.ops import gate_mixture as op
from nextrec_generation import case_seed

pytestmark = pytest.mark.skipif(not op.is_available(), reason="nextrec_fast C++ extension not built")

RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))


def reference(weights, experts):
    return torch.bmm(weights, experts)


def experts_in_layout(bank_bed: torch.Tensor, layout: str) -> torch.Tensor:
    """``[B, E, D]`` values in one of the layouts the op meets: batch-major, a transposed view of
    an expert-major bank, or strided in D (copied by the op)."""
    if layout == "batch_major":
        return bank_bed.contiguous()
    if layout == "expert_major":
        return bank_bed.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(*bank_bed.shape[:2], 2 * bank_bed.shape[2], dtype=bank_bed.dtype)
    wide[..., ::2] = bank_bed
    return wide[..., ::2]


def fresh_poisoned_output(shape, dtype):
    """Hand the op's buffer pool a NaN-filled buffer of the output's size, so that an output
    element the kernel does not write shows up (the pool reuses buffers nothing references)."""
    junk = op.gate_mixture(torch.zeros(shape[0], shape[1], 1, dtype=dtype),
                           torch.zeros(shape[0], 1, shape[2], dtype=dtype))
    junk.fill_(float("nan"))
    del junk


@pytest.mark.parametrize("draw", range(4))
@pytest.mark.parametrize("layout", ["batch_major", "expert_major", "strided"])
def test_matches_float64_as_closely_as_bmm(layout, draw):
    seed = case_seed(RUN_SEED, "gate_mixture", layout, draw)
    print(f"seed={seed} (NEXTREC_FAST_TEST_SEED={RUN_SEED})")  # pytest shows it with a failure
    rng = random.Random(seed)
    batch = rng.choice([1, 2, 7, rng.randint(8, 300), 2048])
    gates, experts, dim = rng.randint(1, 5), rng.randint(1, 9), rng.choice([1, 3, 16, 17, rng.randint(2, 160), 128])
    if draw == 0:  # the models' size: an output of >= 1 MB comes from the (poisoned) buffer pool
        batch, gates, dim = 2048, rng.randint(2, 4), 128
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    bank64 = torch.randn(batch, experts, dim, generator=gen, dtype=torch.float64) * rng.choice([1e-3, 1.0, 30.0])
    logits = torch.randn(batch, gates, experts, generator=gen, dtype=torch.float64) * 2
    weights64 = logits.softmax(-1)
    if experts > 1 and rng.random() < 0.5:  # a PLE gate: zero weight on experts it does not see
        weights64[:, 0, rng.randrange(experts)] = 0
    grad64 = torch.randn(batch, gates, dim, generator=gen, dtype=torch.float64)

    w_ref, x_ref = weights64.clone().requires_grad_(), bank64.clone().requires_grad_()
    truth = reference(w_ref, x_ref)
    truth_grads = torch.autograd.grad(truth, (w_ref, x_ref), grad64)

    def run(fn, dtype):
        w = weights64.to(dtype).requires_grad_()
        x = experts_in_layout(bank64.to(dtype), layout).requires_grad_()
        if fn is op.gate_mixture:
            fresh_poisoned_output((batch, gates, dim), dtype)
        out = fn(w, x)
        return [out, *torch.autograd.grad(out, (w, x), grad64.to(dtype))]

    for dtype in (torch.float64, torch.float32):
        got = run(op.gate_mixture, dtype)
        plain = run(torch.bmm, dtype)
        for name, g, p, t in zip(["output", "weights' gradient", "experts' gradient"], got, plain, [truth, *truth_grads]):
            assert g.shape == t.shape and g.dtype == dtype
            assert torch.isfinite(g).all(), f"{name}: non-finite (unwritten?)"
            scale = t.abs().max().item() + 1e-300
            err, err_plain = (g.double() - t).abs().max().item(), (p.double() - t).abs().max().item()
            noise = (1e-12 if dtype == torch.float64 else 1e-6) * scale
            assert err <= 4 * err_plain + noise, f"{dtype} {name}: error {err:.3g}, bmm's {err_plain:.3g}"


def test_experts_gradient_keeps_the_bank_layout():
    """A transposed view of an ``[E, B, D]`` bank gets an expert-major gradient (no copy for the
    bank's backward); a batch-major input gets a batch-major one; the fake agrees."""
    bank = torch.randn(5, 64, 8, generator=torch.Generator().manual_seed(6))
    for experts, expected_strides in [(bank.transpose(0, 1), bank.transpose(0, 1).stride()),
                                      (bank.transpose(0, 1).contiguous(), (40, 8, 1))]:
        x = experts.detach().requires_grad_()
        w = torch.rand(64, 3, 5).requires_grad_()
        (grad_x,) = torch.autograd.grad(op.gate_mixture(w, x).sum(), (x,))
        assert grad_x.stride() == expected_strides
        # The backward op's fake (torch.compile's view of it) gives the same layout.
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
        go, w_fake, x_fake = (mode.from_tensor(t) for t in (torch.zeros(64, 3, 8), w.detach(), x.detach()))
        with mode:
            fake = torch.ops.nextrec_fast.gate_mixture_backward(go, w_fake, x_fake)
        assert fake[1].stride() == expected_strides and fake[0].shape == w.shape


def test_opcheck_and_gradgradcheck():
    """Schema, fake and autograd registration (``opcheck``), and the ``create_graph`` backward
    differentiable again (float64 ``gradgradcheck``)."""
    gen = torch.Generator().manual_seed(3)
    for batch, gates, experts, dim in [(4, 2, 3, 5), (1, 1, 1, 1), (6, 3, 4, 17)]:
        w = torch.rand(batch, gates, experts, generator=gen, dtype=torch.float64)
        x = torch.randn(experts, batch, dim, generator=gen, dtype=torch.float64).transpose(0, 1)
        torch.library.opcheck(torch.ops.nextrec_fast.gate_mixture_forward.default,
                              (w.clone().requires_grad_(), x.clone().requires_grad_()))
        assert torch.autograd.gradgradcheck(op.gate_mixture, (w.clone().requires_grad_(), x.clone().requires_grad_()))


def test_bad_input_raises_clear_errors():
    w, x = torch.rand(4, 2, 3), torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="do not match experts"):
        op.gate_mixture(w, torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match=r"\[B, G, E\]"):
        op.gate_mixture(w[0], x)
    with pytest.raises(TypeError, match="float32 or float64"):
        op.gate_mixture(w.half(), x.half())
    with pytest.raises(TypeError, match="float32 or float64"):
        op.gate_mixture(w, x.double())


@pytest.mark.parametrize("batch,gates,experts,dim", [(4, 0, 3, 5), (4, 2, 0, 5), (0, 2, 3, 5), (4, 2, 3, 0)])
def test_empty_dimensions_match_bmm(batch, gates, experts, dim):
    """No gate, no expert (an empty sum: zeros), no rows or no columns: what bmm gives."""
    w = torch.rand(batch, gates, experts, dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, experts, dim, dtype=torch.float64, requires_grad=True)
    go = torch.randn(batch, gates, dim, dtype=torch.float64)
    got = op.gate_mixture(w, x)
    expected = torch.bmm(w, x)
    assert got.shape == expected.shape and torch.equal(got, expected)
    for g, e in zip(torch.autograd.grad(got, (w, x), go), torch.autograd.grad(expected, (w, x), go)):
        assert g.shape == e.shape and torch.equal(g, e)


def test_fakes_reject_what_the_op_rejects():
    """A trace (fake tensors) fails where the CPU op would, with the same error types."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cases = [((4, 2, 3), (4, 5, 7), torch.float32, torch.float32, ValueError),
             ((2, 3), (4, 3, 7), torch.float32, torch.float32, ValueError),
             ((4, 2, 3), (4, 3, 7), torch.float32, torch.float64, TypeError),
             ((4, 2, 3), (4, 3, 7), torch.float16, torch.float16, TypeError)]
    for w_shape, x_shape, w_dtype, x_dtype, error in cases:
        w, x = torch.rand(w_shape, dtype=w_dtype), torch.rand(x_shape, dtype=x_dtype)
        with pytest.raises(error):
            torch.ops.nextrec_fast.gate_mixture_forward(w, x)
        mode = FakeTensorMode()
        fw, fx = mode.from_tensor(w), mode.from_tensor(x)
        with mode, pytest.raises(error):
            torch.ops.nextrec_fast.gate_mixture_forward(fw, fx)


def test_forward_mode_ad_keeps_bmm():
    """The op has no forward-mode formula: under forward AD the layer keeps bmm, whose tangent
    is the product rule's."""
    import torch.autograd.forward_ad as fwAD
    from nextrec_fast.layers.gates import mix_expert_weights
    w, x = torch.rand(8, 2, 3, dtype=torch.float64), torch.randn(8, 3, 4, dtype=torch.float64)
    tw, tx = torch.randn_like(w), torch.randn_like(x)
    with fwAD.dual_level():
        out = mix_expert_weights([fwAD.make_dual(w[:, 0], tw[:, 0]), fwAD.make_dual(w[:, 1], tw[:, 1])],
                                 fwAD.make_dual(x, tx))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, torch.bmm(tw, x) + torch.bmm(w, tx))


def test_results_do_not_depend_on_threads():
    gen = torch.Generator().manual_seed(4)
    w = torch.rand(700, 3, 6, generator=gen)
    x = torch.randn(6, 700, 128, generator=gen).transpose(0, 1)
    go = torch.randn(700, 3, 128, generator=gen)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = torch.ops.nextrec_fast.gate_mixture_forward(w, x)
            results.append([out.clone(), *torch.ops.nextrec_fast.gate_mixture_backward(go, w, x)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
