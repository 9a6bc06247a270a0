"""16-bit embedding tables (``embedding.cast_tables``): the model computes what exact math on the
stored values gives, with the pooled features rounded to the tables' dtype, as accurately as
float32 does.

The truth is the per-module model in float64 holding the same (rounded) table values, with the
pooled columns of its embedding output rounded to the 16-bit dtype in the forward, and their
gradient rounded in the backward (``_RoundTo``): the two roundings the fast path makes on purpose
(the pooling op's output dtype is its tables'). The yardstick is that same emulation run in
float32 (``assert_as_accurate``: the fast error at most 10x the plain float32 error plus a floor).
The table gradients are stored in 16 bits, so they get one rounding of that dtype on top
(``relative_floor``). A wrong table dtype, a lost rounding or a missing gradient errs by far more.
"""
from __future__ import annotations

import copy
import os
import pickle
import time

import pytest
import torch

import nextrec_fast
from model_pairs import FLAVOURS, KINDS, forward_backward, model_pair, output_of
from nextrec_generation import assert_as_accurate, case_seed, flip_rows

RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))
DTYPES = [torch.bfloat16, torch.float16]
# One rounding of the 16-bit dtype, relative (its unit roundoff times 2).
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


class _RoundTo(torch.autograd.Function):
    """x rounded to ``dtype`` and back; its gradient likewise (the fast path's ``.to`` does both)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def _emulation(plain, pooled_columns: int, dtype):
    """A copy of ``plain`` with its tables rounded to ``dtype`` (kept in plain's dtype) and its
    embedding output's first ``pooled_columns`` columns (the pooled features; dense ones follow)
    rounded to ``dtype``, forward and backward."""
    model = copy.deepcopy(plain)
    with torch.no_grad():
        for table in model.embedding.embed_dict.values():
            table.weight.copy_(table.weight.to(dtype))

    def round_pooled(module, args, out):
        return torch.cat([_RoundTo.apply(out[:, :pooled_columns], dtype), out[:, pooled_columns:]], dim=1)
    model.embedding.register_forward_hook(round_pooled)
    return model


def _castable_pair(flavour: str, kind: str, seed: int, dtype=None):
    """``model_pair`` with the fast model in float32 and its tables cast to ``dtype`` (None:
    not cast), redrawn (next seeds) while a draw has a feature pooled by its own module (nextrec
    0.6's attention pooling reads the tables itself: cast_tables refuses, as checked here). Also
    returns the pooled columns."""
    for attempt in range(10):
        plain, fast, x64 = model_pair(flavour, kind, seed + attempt)
        # Tables of unit scale (nextrec initialises them ~1e-4), so that what the tables hold
        # shows in the outputs, and rounding them (or not) with it.
        gen = torch.Generator().manual_seed(seed + attempt)
        with torch.no_grad():
            for table in plain.embedding.embed_dict.values():
                table.weight.copy_(torch.randn(table.weight.shape, generator=gen, dtype=torch.float64))
        fast = fast.float()
        fast.load_state_dict(plain.state_dict())
        if any(s.pooling_module is not None for s in fast.embedding.slots):
            with pytest.raises(NotImplementedError, match="pooled by a module of their own"):
                fast.embedding.cast_tables(torch.bfloat16)
            continue
        if dtype is not None:
            fast.embedding.cast_tables(dtype)
        return plain, fast, x64, sum(s.out_dim for s in fast.embedding.slots)
    pytest.skip("10 draws in a row had a feature with attention pooling")


def _float32(x: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in x.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sixteen_bit_tables_forward_and_gradients(flavour, kind, dtype):
    seed = case_seed(RUN_SEED, "table_dtype", flavour, kind, str(dtype))
    plain, fast, x64, pooled_columns = _castable_pair(flavour, kind, seed, dtype)  # plain: float64, train mode
    assert all(t.dtype == dtype for t in fast.embedding.tables())
    truth = _emulation(plain, pooled_columns, dtype)
    plain32 = copy.deepcopy(truth).float()
    x32 = _float32(x64)

    def flipped(model, x):
        out, grads = forward_backward(model, flip_rows(x))
        return out.flip(0), grads
    for mode in ("train", "eval"):
        for m in (fast, truth, plain32):
            m.train(mode == "train")
        if mode == "eval":
            with torch.no_grad():
                got = {"output": output_of(fast, x32)}
                true = {"output": output_of(truth, x64)}
                refs = [{"output": output_of(plain32, x32)}, {"output": output_of(plain32, flip_rows(x32)).flip(0)}]
            assert got["output"].dtype == torch.float32
            assert_as_accurate(got, refs, true, what=f"{mode} output")
            continue
        out, grads = forward_backward(fast, x32)
        true_out, true_grads = forward_backward(truth, x64)
        refs = [forward_backward(plain32, x32), flipped(plain32, x32)]
        for name, t in zip(fast.embedding.embed_dict, fast.embedding.tables()):
            assert t.grad is None or t.grad.dtype == dtype, f"table {name}: gradient {t.grad.dtype}"
        assert_as_accurate({"output": out}, [{"output": r[0]} for r in refs], {"output": true_out},
                           what=f"{mode} output")
        # The tables' gradients are rounded to 16 bits once more when stored.
        assert_as_accurate(grads, [r[1] for r in refs], true_grads, what=f"{mode} gradient",
                           relative_floor=EPS[dtype])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cast_tables_keeps_parameters_trains_copies_and_casts_back(flavour):
    seed = case_seed(RUN_SEED, "cast_tables", flavour)
    for attempt in range(10):  # a draw whose tables get a gradient at all (a tower may end in a dead ReLU)
        _, fast, x64, _ = _castable_pair(flavour, "mmoe", seed + 100 * attempt)
        x = _float32(x64)
        probe = copy.deepcopy(fast)
        output_of(probe, x).sum().backward()
        if any(t.grad is not None and t.grad.any() for t in probe.embedding.tables()):
            break
    else:
        pytest.skip("10 draws in a row gave the tables no gradient")
    params = fast.embedding.tables()
    before = [p.detach().clone() for p in params]
    fast.embedding.cast_tables(torch.bfloat16)
    assert [id(p) for p in fast.embedding.tables()] == [id(p) for p in params], "Parameters must stay the objects"
    assert all(torch.equal(p.data, b.to(torch.bfloat16)) for p, b in zip(params, before))
    assert fast.embedding.table_output_dtype == torch.float32

    optimizer = torch.optim.Adam(fast.parameters(), lr=1e-2)
    out = output_of(fast, x)
    assert out.dtype == torch.float32
    out.sum().backward()
    optimizer.step()
    touched = [p for p in params if p.grad is not None and p.grad.any()]
    assert touched, "no table got a gradient"
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert any(not torch.equal(p.data, b.to(torch.bfloat16)) for p, b in zip(params, before)), "no table moved"

    for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert all(t.dtype == torch.bfloat16 for t in copied.embedding.tables())
        assert copied.embedding.table_output_dtype == torch.float32
        copied.eval()
        fast.eval()
        with torch.no_grad():
            torch.testing.assert_close(output_of(copied, x), output_of(fast, x), rtol=0, atol=0)
        fast.train()

    stored = [p.detach().clone() for p in params]
    fast.embedding.cast_tables(torch.float32)
    assert fast.embedding.table_output_dtype is None
    assert all(p.dtype == torch.float32 and torch.equal(p.data, s.float()) for p, s in zip(params, stored))


def test_cast_tables_errors_name_the_fix():
    _, fast, x64 = model_pair("standalone", "esmm", case_seed(RUN_SEED, "cast_tables_errors"))
    fast = fast.float()
    for wrong in (torch.int8, torch.float64):  # float64: not the model's dtype, which model.to() changes
        with pytest.raises(TypeError, match=r"torch.bfloat16 or torch.float16, or torch.float32 \(the model's dtype\)"):
            fast.embedding.cast_tables(wrong)
    fast.embedding.cast_tables(torch.float32)  # the model's dtype: nothing to do
    assert fast.embedding.table_output_dtype is None
    fast.embedding.cast_tables(torch.bfloat16)
    with nextrec_fast.use_backend("reference"), pytest.raises(
            NotImplementedError, match=r"^the reference backend is active: .*cast_tables\(torch.float32\) first"):
        output_of(fast, _float32(x64))
    fast.embedding.embed_dict[next(iter(fast.embedding.embed_dict))].register_forward_hook(lambda *args: None)
    with pytest.raises(NotImplementedError, match=r"^a hook or parametrisation on a table"):
        output_of(fast, _float32(x64))


@pytest.mark.nextrec
def test_restore_casts_sixteen_bit_tables_back():
    _, fast, x64, _ = _castable_pair("accelerated", "ple", case_seed(RUN_SEED, "restore_tables"), torch.float16)
    nextrec_fast.restore(fast)
    assert all(t.weight.dtype == torch.float32 for t in fast.embedding.embed_dict.values())
    assert "table_output_dtype" not in fast.embedding.__dict__
    output_of(fast, _float32(x64))  # nextrec's own forward runs on them again
