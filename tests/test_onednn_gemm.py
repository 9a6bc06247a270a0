"""``nextrec_fast::onednn_gemm_out`` and ``dense_gemm.gemm_into``: float32 GEMMs through oneDNN.

The layouts are the experts' (``layers.experts``): dense, column blocks of ``[B, E*K]``,
transposed views, column-major outputs (a ``weight_t`` gradient, written as the transposed
product), and weight gradients (``x.t() @ grad``, a sum over thousands of rows).

Judged against float64: the median relative error over all non-zero elements may be at most
``FACTOR`` times ``torch.mm``'s (MKL's) on the same inputs, and the largest error at most
``MAX_FACTOR`` times mm's largest plus a few ulps of the output's scale. Measured here: oneDNN's
median is 1.3-1.5x mm's, weight gradients included. Outputs are poisoned (NaN) before the op writes, and the columns around a strided output
block must come back untouched.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from nextrec_fast.ops import dense_gemm

pytestmark = pytest.mark.skipif(not dense_gemm.is_available(),
                                reason=f"oneDNN float32 GEMM not reachable here: {dense_gemm.unavailable_reason()}")

FACTOR = 2.0
# The largest error is a tail statistic of a different summation order: oneDNN's ran 1.5-2.8x
# mm's at [4, 147, 477] @ [4, 477, N] (its median 1.5x). A missing or doubled term would be
# orders of magnitude off.
MAX_FACTOR = 4.0
SEED = random.randrange(2**31)


@pytest.fixture
def rng():
    print(f"seed={SEED}")
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    monkeypatch.setattr(dense_gemm, "ONEDNN_MIN_MACS", 0)  # the shapes here are small on purpose
    monkeypatch.setattr(dense_gemm, "routed", lambda: True)  # on Intel CPUs too, where MKL is the default


def _relative_errors(result: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    keep = truth != 0
    return ((result.double() - truth)[keep] / truth[keep]).abs()


def _case(rng, batched: bool, strided: bool, transposed_b: bool, transposed_out: bool = False):
    """(a, b, out parent, out view) with random sizes; strided: a and out are column blocks of
    wider tensors (the experts' [B, E*K] layout); transposed_out: out is column-major (a
    weight_t gradient), a transposed view of its parent."""
    # At least 8 along each side: a median over a few dozen elements, or of sums of one or two
    # products (exact in both libraries), says little about rounding; edges are covered anyway.
    m, k, n = (int(torch.randint(lo, hi, (1,), generator=rng)) for lo, hi in ((8, 300), (8, 500), (8, 300)))
    e = int(torch.randint(1, 5, (1,), generator=rng)) if batched else None
    lead = (e,) if batched else ()
    a_full = torch.randn(*lead, m, k + (7 if strided else 0), generator=rng)
    a = a_full[..., 3:3 + k] if strided else a_full
    if transposed_b:
        b = torch.randn(*lead, n, k, generator=rng).transpose(-1, -2)  # a Linear's weight.t()
    else:
        b = torch.randn(*lead, k, n, generator=rng)
    if transposed_out:
        parent = torch.full((*lead, n, m), float("nan"))
        return a, b, parent, parent.transpose(-1, -2)
    parent = torch.full((*lead, m, n + (5 if strided else 0)), float("nan"))
    out = parent[..., 2:2 + n] if strided else parent
    return a, b, parent, out


@pytest.mark.parametrize("batched", [False, True], ids=["mm", "bmm"])
@pytest.mark.parametrize("layout", ["dense", "column_blocks", "transposed_a", "transposed_out", "weight_gradient"])
@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "weight_t"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_as_close_to_float64_as_torch_mm(rng, batched, layout, transposed_b, with_bias):
    strided = layout == "column_blocks"
    ours_rel, mm_rel = [], []  # pooled over the draws: a median of a few dozen elements is noisy
    for _ in range(6):
        a, b, parent, out = _case(rng, batched, strided, transposed_b, transposed_out=layout == "transposed_out")
        if layout == "transposed_a":  # a gradient's grad.t(): a transposed view
            a = a.mT.contiguous().mT
        if layout == "weight_gradient":  # x.t() @ grad: a sum over 2048-8192 rows, x a ReLU output
            rows = int(torch.randint(2048, 8193, (1,), generator=rng))
            lead = a.shape[:-2]
            a = torch.randn(*lead, rows, a.shape[-2], generator=rng).relu().mT
            b = torch.randn(*lead, rows, b.shape[-1], generator=rng)
        bias = None
        if with_bias:
            bias = torch.randn(*((a.shape[0], 1) if batched else ()), b.shape[-1], generator=rng)
        dense_gemm.gemm_into(out, a, b, bias)
        truth = a.double() @ b.double() + (0 if bias is None else bias.double())
        mm = a @ b + (0 if bias is None else bias)
        ours_rel.append(_relative_errors(out, truth))
        mm_rel.append(_relative_errors(mm, truth))
        ours_max, mm_max = ((r.double() - truth).abs().max().item() for r in (out, mm))
        scale = truth.abs().max().item()
        assert ours_max <= MAX_FACTOR * mm_max + 4 * torch.finfo(torch.float32).eps * scale, (a.shape, ours_max, mm_max)
        if strided:  # nothing written outside the block
            outside = torch.cat([parent[..., :2], parent[..., 2 + b.shape[-1]:]], dim=-1)
            assert torch.isnan(outside).all()
    ours_median, mm_median = (torch.cat(r).median().item() for r in (ours_rel, mm_rel))
    print(f"median relative error: ours {ours_median:.2e}, torch.mm {mm_median:.2e}")
    assert ours_median <= FACTOR * mm_median, (ours_median, mm_median)


def test_goes_through_onednn_and_is_recorded_as_a_gemm():
    """The op runs (no silent fallback to mm here, where oneDNN is available), and the bench's
    GEMM floor records it."""
    from nextrec_fast.bench import gemm_floor
    a, b = torch.randn(64, 48), torch.randn(48, 32)
    out = torch.empty(64, 32)
    assert dense_gemm.uses_onednn(a, b)
    before = torch.ops.nextrec_fast.onednn_gemm_calls()
    calls = gemm_floor.record_gemms(lambda: dense_gemm.gemm_into(out, a, b))
    assert torch.ops.nextrec_fast.onednn_gemm_calls() == before + 1  # reached oneDNN, no fallback
    assert [c.op for c in calls] == [torch.ops.nextrec_fast.onednn_gemm_out.default]
    assert calls[0].gflop == pytest.approx(2 * 64 * 48 * 32 / 1e9)


def test_many_tiny_batched_products_take_torch_bmm():
    """Batched products narrower than BATCHED_MIN_N columns (the gates' mixture weight gradient)
    stay with torch.bmm, wider ones and 2-D GEMMs of any width go to oneDNN; either way the
    result is the product."""
    narrow = dense_gemm.BATCHED_MIN_N - 1
    a, x = torch.randn(512, 3, 128), torch.randn(512, 128, narrow)
    assert not dense_gemm.uses_onednn(a, x)
    assert dense_gemm.uses_onednn(a, torch.randn(512, 128, dense_gemm.BATCHED_MIN_N))
    assert dense_gemm.uses_onednn(torch.randn(2048, 477), torch.randn(477, narrow))
    out = torch.full((512, 3, narrow), float("nan"))
    dense_gemm.gemm_into(out, a, x)
    torch.testing.assert_close(out, torch.bmm(a, x), rtol=0, atol=0)


def test_expert_block_linear_through_onednn(rng, monkeypatch):
    """``experts._ExpertBlockLinear`` (the experts' Linear on column blocks of ``[B, E*K]``) in
    float32 with every GEMM sent to oneDNN: output and the input's, weights' and biases'
    gradients against per-expert ``F.linear`` in float64, within float32 rounding; each
    gradient block is copied for oneDNN once (``onednn_operand``), not once per GEMM."""
    from nextrec_fast.layers import experts
    monkeypatch.setattr(dense_gemm, "ONEDNN_MIN_MACS", 0)
    batch, count, k, n = 48, 3, 20, 12
    x = torch.randn(batch, count * k, generator=rng, requires_grad=True)
    weights = [torch.randn(n, k, generator=rng, requires_grad=True) for _ in range(count)]
    biases = [torch.randn(n, generator=rng, requires_grad=True) for _ in range(count)]
    upstream = torch.randn(batch, count * n, generator=rng)
    params = [x, *weights, *biases]
    copies = []
    real = dense_gemm._pooled_copy
    monkeypatch.setattr(dense_gemm, "_pooled_copy", lambda t: copies.append(tuple(t.shape)) or real(t))
    before = torch.ops.nextrec_fast.onednn_gemm_calls()
    out = experts._ExpertBlockLinear.apply(x, count, *weights, *biases)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    assert torch.ops.nextrec_fast.onednn_gemm_calls() - before == 3 * count  # forward, dX, dW per expert
    assert copies.count((batch, n)) == count, copies  # the gradient's column blocks, once each
    ps = [p.detach().double().requires_grad_() for p in params]
    want = torch.cat([F.linear(ps[0][:, e * k:(e + 1) * k], ps[1 + e], ps[1 + count + e]) for e in range(count)], 1)
    want_grads = torch.autograd.grad((want * upstream.double()).sum(), ps)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"gradient {i}: {m}")


def test_other_dtypes_and_backends_take_torch_mm(monkeypatch):
    a, b = torch.randn(40, 30, dtype=torch.float64), torch.randn(30, 20, dtype=torch.float64)
    assert not dense_gemm.uses_onednn(a, b)
    out = torch.empty(40, 20, dtype=torch.float64)
    dense_gemm.gemm_into(out, a, b)
    assert torch.equal(out, a @ b)
    import nextrec_fast
    with nextrec_fast.use_backend("torch"):
        assert not dense_gemm.uses_onednn(a.float(), b.float())
    monkeypatch.setattr(dense_gemm, "ONEDNN_MIN_MACS", 40 * 30 * 20 + 1)
    assert not dense_gemm.uses_onednn(a.float(), b.float())


def test_op_takes_blas_for_a_column_major_output():
    """oneDNN would run its reference matmul there (~100x slower): the op takes at::mm_out."""
    a, b = torch.randn(30, 20), torch.randn(20, 10)
    out = torch.full((10, 30), float("nan")).t()
    before = torch.ops.nextrec_fast.onednn_gemm_calls()
    torch.ops.nextrec_fast.onednn_gemm_out(a, b, out, False)
    assert torch.ops.nextrec_fast.onednn_gemm_calls() == before
    assert torch.allclose(out, a @ b, rtol=1e-5, atol=1e-5)
    out = torch.full((10, 30), float("nan")).t()
    dense_gemm.gemm_into(out, a, b)  # gemm_into writes the transposed product through oneDNN
    assert torch.ops.nextrec_fast.onednn_gemm_calls() == before + 1
    assert torch.allclose(out, a @ b, rtol=1e-5, atol=1e-5)


def test_refuses_inputs_that_need_autograd():
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="without autograd"):
        dense_gemm.gemm_into(torch.empty(8, 3), a, b)
    with torch.no_grad():
        dense_gemm.gemm_into(torch.empty(8, 3), a, b)


def test_op_accumulates_and_falls_back_for_float64():
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    out = torch.ones(9, 7, dtype=torch.float64)
    torch.ops.nextrec_fast.onednn_gemm_out(a, b, out, True)  # float64: at::addmm_ (no oneDNN)
    assert torch.allclose(out, 1 + a @ b, rtol=0, atol=1e-12)


def test_op_rejects_shapes_that_do_not_multiply():
    with pytest.raises(RuntimeError, match="shapes do not multiply"):
        torch.ops.nextrec_fast.onednn_gemm_out(torch.randn(3, 4), torch.randn(5, 6), torch.empty(3, 6), False)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.nextrec_fast.onednn_gemm_out(torch.randn(3, 4), torch.randn(4, 6).double(), torch.empty(3, 6), False)


def test_opcheck():
    a, b = torch.randn(16, 24), torch.randn(24, 8)
    torch.library.opcheck(torch.ops.nextrec_fast.onednn_gemm_out.default, (a, b, torch.empty(16, 8), False),
                          test_utils=("test_schema", "test_faketensor"))


DRAWS = 8  # pooled: one model's median moves with its draw (see tests/test_precision.py)


def _flat(result, names) -> torch.Tensor:
    """Output and the gradients of ``names``, flattened, in float64."""
    out, grads = result
    parts = [out.reshape(-1)] + [grads[n].reshape(-1) for n in names]
    return torch.cat([t.double() for t in parts])


@pytest.mark.parametrize("kind", ["esmm", "mmoe", "ple"])
@pytest.mark.parametrize("flavour", [
    "standalone", "standalone_v06", pytest.param("accelerated", marks=pytest.mark.nextrec)])
def test_models_with_every_gemm_through_onednn(flavour, kind, monkeypatch):
    """Every float32 GEMM of the fast model through oneDNN (``ONEDNN_MIN_MACS`` = 0): its
    outputs and gradients are as close to float64 as the per-module model's float32 (median
    relative error over all non-zero elements, pooled over ``DRAWS`` random models, at most
    ``FACTOR`` times), and oneDNN did run."""
    import copy

    from model_pairs import forward_backward, model_pair
    from nextrec_fast.layers import experts
    from nextrec_fast.ops import reusable_buffer
    # At these batches (3-9 rows) the layers would keep torch's own GEMMs (no output buffer
    # worth reusing): take the reused-buffer paths that reach gemm_into, one bmm per layer on
    # even draws and one GEMM per expert on odd ones.
    monkeypatch.setattr(reusable_buffer, "MIN_BYTES", 0)
    taken = []
    original = dense_gemm.uses_onednn
    monkeypatch.setattr(dense_gemm, "uses_onednn", lambda a, b: taken.append(original(a, b)) or taken[-1])
    ours, plain = [], []
    for draw in range(DRAWS):
        seed = (SEED + 7919 * draw) % 2**31
        monkeypatch.setattr(experts, "PER_EXPERT_BMM_MIN_ROWS", 0 if draw % 2 else 1 << 30)
        monkeypatch.setattr(experts, "_cpu_threads", lambda: 2)  # experts % 2 != 0 takes one GEMM per expert
        plain64, fast64, x64 = model_pair(flavour, kind, seed)
        out64, grads64 = forward_backward(plain64, x64)
        names = [n for n, g in grads64.items() if g is not None]
        truth = _flat((out64, grads64), names)
        keep = truth != 0
        x32 = {k: v.float() if v.is_floating_point() else v for k, v in x64.items()}
        for model, sink in ((fast64, ours), (plain64, plain)):
            result = forward_backward(copy.deepcopy(model).float(), x32)
            assert all(result[1][n] is not None for n in names), "a gradient went missing"
            sink.append(((_flat(result, names) - truth)[keep] / truth[keep]).abs())
    assert any(taken), "no GEMM reached oneDNN"
    fast32 = copy.deepcopy(fast64).float()
    forward_backward(fast32, x32)
    for name, p in fast32.named_parameters():  # gradients in their parameters' own layouts
        assert p.grad is None or p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
    err_ours, err_plain = (torch.cat(e).median().item() for e in (ours, plain))
    print(f"median relative error: ours {err_ours:.2e}, per-module float32 {err_plain:.2e}")
    assert err_ours <= FACTOR * err_plain, (err_ours, err_plain)
