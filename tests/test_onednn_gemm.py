"""``nextrec_fast::onednn_gemm_out`` and ``dense_gemm.gemm_into``: float32 GEMMs through oneDNN.

Judged against float64: the median relative error over all non-zero elements may be at most
``FACTOR`` times ``torch.mm``'s (MKL's) on the same inputs, and the largest error at most
``FACTOR`` times mm's largest plus a few ulps of the output's scale. Measured here: oneDNN's
median is 1.3-1.5x mm's for the forward and input-gradient shapes (the weight gradient stays on
mm). Outputs are poisoned (NaN) before the op writes, and the columns around a strided output
block must come back untouched.
"""
from __future__ import annotations

import random

import pytest
import torch

from nextrec_fast.ops import dense_gemm

pytestmark = pytest.mark.skipif(not dense_gemm.is_available(),
                                reason="oneDNN float32 GEMM not reachable here (extension not built, a libtorch "
                                       "without at::native::mkldnn_matmul, or a CPU oneDNN refuses)")

FACTOR = 2.0
SEED = random.randrange(2**31)


@pytest.fixture
def rng():
    print(f"seed={SEED}")
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    monkeypatch.setattr(dense_gemm, "ONEDNN_MIN_MACS", 0)  # the shapes here are small on purpose


def _relative_errors(result: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    keep = truth != 0
    return ((result.double() - truth)[keep] / truth[keep]).abs()


def _case(rng, batched: bool, strided: bool, transposed_b: bool, transposed_out: bool = False):
    """(a, b, out parent, out view) with random sizes; strided: a and out are column blocks of
    wider tensors (the experts' [B, E*K] layout); transposed_out: out is column-major (a
    weight_t gradient), a transposed view of its parent."""
    m, k, n = (int(torch.randint(lo, hi, (1,), generator=rng)) for lo, hi in ((1, 300), (1, 500), (1, 300)))
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
@pytest.mark.parametrize("layout", ["dense", "column_blocks", "transposed_a", "transposed_out"])
@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "weight_t"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_as_close_to_float64_as_torch_mm(rng, batched, layout, transposed_b, with_bias):
    strided = layout == "column_blocks"
    ours_rel, mm_rel = [], []  # pooled over the draws: a median of a few dozen elements is noisy
    for _ in range(4):
        a, b, parent, out = _case(rng, batched, strided, transposed_b, transposed_out=layout == "transposed_out")
        if layout == "transposed_a":  # a gradient's grad.t(): a transposed view
            a = a.mT.contiguous().mT
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
        assert ours_max <= FACTOR * mm_max + 4 * torch.finfo(torch.float32).eps * scale, (a.shape, ours_max, mm_max)
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
    calls = gemm_floor.record_gemms(lambda: dense_gemm.gemm_into(out, a, b))
    assert [c.op for c in calls] == [torch.ops.nextrec_fast.onednn_gemm_out.default]
    assert calls[0].gflop == pytest.approx(2 * 64 * 48 * 32 / 1e9)


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
    torch.ops.nextrec_fast.onednn_gemm_out(a, b, out, False)
    assert torch.allclose(out, a @ b, rtol=1e-5, atol=1e-5)


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
