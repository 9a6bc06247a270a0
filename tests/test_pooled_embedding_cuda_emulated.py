"""The CUDA pooling and embedding-update code, run on the CPU.

csrc/pooled_embedding_cuda.cu and csrc/embedding_update_cuda.cu are compiled here as plain C++
with csrc/cuda_emulation.h (every (block, thread) of a launch runs in turn, blocks in reverse
order) and registered for CPU tensors as torch.ops.nextrec_fast_emu. Their kernels keep threads
independent (no shared memory, barriers or shuffles), so this executes the GPU's code: the lane
loops and index math of the forward, the atomic and the deterministic sort-and-reduce backward,
the coalesced backward and the optimiser updates of the in-backward optimisers, the per-id weight
gradient, the device-side id and offset checks and how the host code turns them into Python errors. What it
cannot show: races, memory coalescing, speed (benchmarks/gpu_check.sh, on a GPU).

Compared against nextrec's formulas in float64 (the reference of test_pooled_embedding.py) and
against the CPU op, on fresh random feature mixes.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from nextrec_fast.ops import pooled_embedding as pe
from test_pooled_embedding import TOL, _common_op_args, reference, reference_grads, random_case, rng  # noqa: F401

CSRC = Path(__file__).resolve().parents[1] / "csrc"

pytestmark = [
    pytest.mark.skipif(not pe.is_available(), reason=f"extension unavailable: {pe.unavailable_reason()}"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++"),
]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("cuda_emulation")
    sources = [(CSRC / "pooled_embedding.cpp", []), (CSRC / "embedding_update.cpp", [])]  # the schemas
    for cu in ("pooled_embedding_cuda.cu", "embedding_update_cuda.cu"):
        wrapper = out / f"{cu}.cpp"
        wrapper.write_text(f'#include "{CSRC / cu}"\n')
        sources.append((wrapper, ["-x", "c++"]))
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    flags = ["-O1", "-std=c++20", "-fPIC", "-fopenmp", "-DNEXTREC_FAST_CUDA_EMULATION",
             "-DNEXTREC_FAST_OP_NAMESPACE=nextrec_fast_emu", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *includes]
    objects = [out / f"{k}.o" for k in range(len(sources))]
    jobs = [subprocess.Popen(["g++", *flags, *extra, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for (src, extra), obj in zip(sources, objects)]
    for job in jobs:
        log = job.communicate(timeout=600)[0]
        assert job.returncode == 0, log[-4000:]
    lib = out / "libnextrec_fast_cuda_emulated.so"
    link = ["g++", "-shared", *map(str, objects), "-o", str(lib), "-fopenmp",
            *[f"-L{p}" for p in cpp_extension.library_paths()], "-lc10", "-ltorch", "-ltorch_cpu"]
    proc = subprocess.run(link, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch.ops.load_library(str(lib))
    return torch.ops.nextrec_fast_emu


def _forward(ops, case, tables, check_ids=True):
    return ops.pooled_embedding_forward(*_common_op_args(case, tables), case["grad_padding_idx"], check_ids, False,
                                        False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("draw", range(3))
def test_forward_matches_reference_and_cpu_op(emu, rng, dtype, draw):
    case, tables = random_case(rng, dtype=dtype, weights=True, half=dtype in (torch.float16, torch.bfloat16))
    out = _forward(emu, case, tables)
    assert out.dtype == dtype and not torch.isnan(out).any()
    weights = case["per_id_weights"]
    torch.testing.assert_close(out.double(), reference(case, tables, weights), **TOL[dtype])
    # Same per-bag logic (pooling_common.h) and summation order as the CPU kernel.
    torch.testing.assert_close(out, _forward(torch.ops.nextrec_fast, case, tables), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("draw", range(2))
def test_dense_backward_matches_reference(emu, rng, dtype, deterministic, draw):
    case, tables = random_case(rng, dtype=dtype, weights=True, half=dtype == torch.bfloat16)
    out = _forward(emu, case, tables)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    _, ref_grads, ref_wgrads = reference_grads(case, tables, grad_out, case["per_id_weights"])
    need = [1] * len(tables)
    grads = emu.pooled_embedding_backward(grad_out, *_common_op_args(case, tables), case["grad_padding_idx"], need,
                                          deterministic)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), exp, **TOL[dtype])
    # backward_into overwrites caller buffers (poisoned here) with the same gradients.
    buffers = [torch.full_like(t, float("nan")) for t in tables]
    emu.pooled_embedding_backward_into(grad_out, buffers, *_common_op_args(case, tables), case["grad_padding_idx"],
                                       need, deterministic)
    for got, exp in zip(buffers, grads):
        torch.testing.assert_close(got, exp, rtol=0, atol=0) if deterministic else \
            torch.testing.assert_close(got.double(), exp.double(), **TOL[dtype])
    # backward_into_dirty: buffers holding NaN in their listed dirty rows (zeros elsewhere), or
    # poisoned whole with no rows listed, get the same gradients.
    dirty = [torch.randint(0, t.shape[0], (rng.randint(0, 2 * t.shape[0]),)) if rng.random() < 0.5 else None
             for t in tables]
    buffers = []
    for t, rows in zip(tables, dirty):
        if rows is None:
            buffers.append(torch.full_like(t, float("nan")))
        else:
            buffers.append(torch.zeros_like(t))
            buffers[-1][rows] = float("nan")
    emu.pooled_embedding_backward_into_dirty(grad_out, buffers, *_common_op_args(case, tables),
                                             case["grad_padding_idx"], need, deterministic, dirty)
    for got, exp in zip(buffers, grads):
        torch.testing.assert_close(got, exp, rtol=0, atol=0) if deterministic else \
            torch.testing.assert_close(got.double(), exp.double(), **TOL[dtype])
    weighted = [f for f, w in enumerate(case["per_id_weights"]) if w is not None]
    if weighted:
        wgrads = emu.pooled_embedding_weight_backward(grad_out, *_common_op_args(case, tables))
        for f, got in zip(weighted, wgrads):
            exp = ref_wgrads[f] if ref_wgrads[f] is not None else torch.zeros(got.shape, dtype=torch.float64)
            torch.testing.assert_close(got.double(), exp, **TOL[dtype])


def test_deterministic_backward_matches_cpu_bit_for_bit_in_float64(emu, rng):
    # Both reduce each row's contributions in emission (feature, row, position) order.
    case, tables = random_case(rng, batch=33, dtype=torch.float64)
    out = _forward(emu, case, tables)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    need = [1] * len(tables)
    args = (grad_out, *_common_op_args(case, tables), case["grad_padding_idx"], need, True)
    for got, exp in zip(emu.pooled_embedding_backward(*args), torch.ops.nextrec_fast.pooled_embedding_backward(*args)):
        torch.testing.assert_close(got, exp, rtol=1e-15, atol=1e-15)


def _feature_args(ids, offsets=None):
    n = len(ids)
    return ([torch.randn(10, 4)], ids, offsets or [None] * n, [], [], [0] * n, [0] * n, [-1] * n, [-1] * n,
            [f"feat{i}" for i in range(n)], [-1], True, False, False)


@pytest.mark.parametrize("bad_id", [10, -1, 2**40, -(2**40)])
def test_device_side_id_check_names_the_feature(emu, bad_id):
    ids = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, bad_id], [3, 4]])]
    with pytest.raises(ValueError, match=f"feat1.*id {bad_id}.*out of range"):
        emu.pooled_embedding_forward(*_feature_args(ids))


@pytest.mark.parametrize("offsets,match", [([0, 4, 3], "non-decreasing"), ([1, 2, 3], "start at|end at|0"),
                                           ([0, 1, 2], "end at")])
def test_device_side_offset_checks(emu, offsets, match):
    ids = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([1, 2, 3])]
    with pytest.raises(ValueError, match=f"feat1.*({match})"):
        emu.pooled_embedding_forward(*_feature_args(ids, [None, torch.tensor(offsets)]))


def test_unchecked_fast_path_pools_valid_ids(emu, rng):
    case, tables = random_case(rng, dtype=torch.float64)
    torch.testing.assert_close(_forward(emu, case, tables, check_ids=False), reference(case, tables))


# ---- the in-backward optimisers' CUDA path: coalesced backward and row updates --------------

def _coalesced(ops, case, tables, grad_out, need):
    *flat, finite = ops.pooled_embedding_backward_coalesced(grad_out, *_common_op_args(case, tables),
                                                            case["grad_padding_idx"], need)
    return list(zip(flat[0::2], flat[1::2])), finite


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("draw", range(2))
def test_coalesced_backward_matches_reference_and_cpu_op(emu, rng, dtype, draw):
    """Distinct rows ascending (the CPU: first-appearance order), sums equal to the CPU op's bit
    for bit (same entry order, same accumulation type) and to the float64 reference's dense
    gradient rows; tables left out (need 0) get nothing."""
    half = dtype in (torch.float16, torch.bfloat16)
    case, tables = random_case(rng, dtype=dtype, weights=True, half=half)
    out = _forward(emu, case, tables)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    need = [rng.choice([0, 1]) for _ in tables]
    need[rng.randrange(len(tables))] = 1
    _, ref_grads, _ = reference_grads(case, tables, grad_out, case["per_id_weights"])
    got, finite = _coalesced(emu, case, tables, grad_out, need)
    exp, exp_finite = _coalesced(torch.ops.nextrec_fast, case, tables, grad_out, need)
    wanted = [t for t, n in enumerate(need) if n]
    assert len(got) == len(exp) == len(wanted) and finite.tolist() == exp_finite.tolist() == [True] * len(wanted)
    acc = torch.float32 if half else dtype
    for t, (rows, sums), (cpu_rows, cpu_sums) in zip(wanted, got, exp):
        assert rows.dtype == torch.int64 and sums.dtype == acc and sums.shape == (len(rows), tables[t].shape[1])
        assert torch.equal(rows, torch.sort(rows).values) and len(set(rows.tolist())) == len(rows)
        order = torch.argsort(cpu_rows)
        assert torch.equal(rows, cpu_rows[order])
        torch.testing.assert_close(sums, cpu_sums[order], rtol=0, atol=0)
        dense = torch.zeros(tables[t].shape, dtype=torch.float64)
        dense[rows] = sums.double()
        torch.testing.assert_close(dense, ref_grads[t], **TOL[dtype])


def test_coalesced_backward_flags_non_finite_tables(emu, rng):
    case, tables = random_case(rng, batch=7, dtype=torch.float32)
    out = _forward(emu, case, tables)
    grad_out = torch.randn(out.shape)
    grad_out[rng.randrange(out.shape[0]), rng.randrange(out.shape[1])] = rng.choice([float("nan"), float("inf")])
    need = [1] * len(tables)
    got, finite = _coalesced(emu, case, tables, grad_out, need)
    _, cpu_finite = _coalesced(torch.ops.nextrec_fast, case, tables, grad_out, need)
    assert finite.tolist() == cpu_finite.tolist()
    for (rows, sums), ok in zip(got, finite.tolist()):
        assert bool(torch.isfinite(sums).all()) == ok


def _update_case(rng, rule, dtype):
    """A table, distinct rows (some of them), their gradients and the rule's state and hyper-parameters."""
    vocab, dim = rng.randint(3, 40), rng.choice([1, 3, 8, 16, 33])
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    table = torch.randn(vocab, dim, dtype=torch.float64).to(dtype)
    rows = torch.randperm(vocab)[:rng.randint(0, vocab)]
    grad = torch.randn(len(rows), dim, dtype=torch.float64).to(acc)
    state = {0: [], 1: [torch.rand(vocab, dim, dtype=acc)], 2: [torch.rand(vocab, dtype=acc)],
             3: [torch.randn(vocab, dim, dtype=acc), torch.rand(vocab, dim, dtype=acc)]}[rule]
    hyper = {0: [0.3], 1: [0.2, 1e-6], 2: [0.2, 1e-6, rng.choice([0.0, 0.01])], 3: [0.05, 0.8, 0.95, 1e-6]}[rule]
    return table, state, rows, grad, hyper


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rows_update_matches_cpu_op_bit_for_bit(emu, rng, dtype):
    """Every rule, several tables in one call, as the CPU kernel computes (shared formulas,
    embedding_update.h): tables and state equal to the bit, rows not listed untouched."""
    cases = [(rule, _update_case(rng, rule, dtype)) for rule in (0, 1, 2, 3, rng.randrange(4))]

    def run(ops):
        tables = [c[0].clone() for _, c in cases]
        state = [s.clone() for _, c in cases for s in c[1]]
        ops.embedding_rows_update_(tables, state, [c[2] for _, c in cases], [c[3] for _, c in cases],
                                   [rule for rule, _ in cases], [h for _, c in cases for h in c[4]])
        return tables, state

    got, got_state = run(emu)
    exp, exp_state = run(torch.ops.nextrec_fast)
    for g, e, (_, (initial, _, rows, _, _)) in zip(got, exp, cases):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        untouched = torch.ones(initial.shape[0], dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(g[untouched], initial[untouched])
    for g, e in zip(got_state, exp_state):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_rows_update_refuses_out_of_range_rows_and_changes_nothing(emu, rng):
    good, bad = _update_case(rng, 0, torch.float32), _update_case(rng, 2, torch.float32)
    tables = [good[0].clone(), bad[0].clone()]
    rows = bad[2].clone() if len(bad[2]) else torch.tensor([0])
    rows[0] = tables[1].shape[0]
    grad = torch.randn(len(rows), tables[1].shape[1])
    with pytest.raises(IndexError, match="out of range"):
        emu.embedding_rows_update_(tables, bad[1], [good[2], rows], [good[3], grad], [0, 2], good[4] + bad[4])
    assert torch.equal(tables[0], good[0]) and torch.equal(tables[1], bad[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "rowwise_adagrad", "sparse_adam"])
def test_in_backward_optimizer_steps_on_the_cuda_code(emu, rng, rule, dtype):
    """Several optimiser steps taken by the CUDA code (coalesced backward, then the update, with
    the hyper-parameters and state nextrec_fast.optim gives the op) equal the CPU in-backward path
    bit for bit, and in float64 the references of tests/test_optim.py (torch's optimisers on
    sparse gradients, FBGEMM's row-wise Adagrad in plain PyTorch)."""
    import test_optim
    from nextrec_fast import optim

    local = random.Random(rng.randrange(2**31))
    tables, spec = test_optim._case(local, dtype)
    batches = test_optim._batches(local, tables, spec, steps=3)
    cls, kwargs = test_optim.RULES[rule]
    params = [torch.nn.Parameter(t.clone()) for t in tables]
    opt = optim.apply_optimizer_in_backward(cls, params, kwargs)
    combiners = [pe.COMBINERS[c] for c in spec["combiners"]]
    with torch.no_grad():
        for ids, weight in batches:
            *flat, finite = emu.pooled_embedding_backward_coalesced(
                weight.to(dtype), list(params), ids, [None] * len(ids), [], [], spec["table_index"], combiners,
                spec["mask_ids"], spec["max_lens"], spec["feature_names"], spec["grad_padding_idx"], [1] * len(params))
            assert bool(finite.all())
            updates = [(opt, p, rows, sums) for p, rows, sums in zip(params, flat[0::2], flat[1::2])]
            emu.embedding_rows_update_(*optim.EmbeddingOptimizerInBackward.op_arguments(updates))
    cpu, cpu_state = test_optim._run(rule, tables, spec, batches, fused=True)
    for g, e in zip(params, cpu):
        torch.testing.assert_close(g.detach(), e, rtol=0, atol=0)
    for p, es in zip(params, cpu_state):
        for key in {"sum", "exp_avg", "exp_avg_sq"} & set(es):
            torch.testing.assert_close(opt.state[p][key], es[key], rtol=0, atol=0)
    if dtype == torch.float64:
        ref, _ = test_optim._run(rule, tables, spec, batches, fused=False)
        for g, e in zip(params, ref):
            torch.testing.assert_close(g.detach(), e, rtol=1e-12, atol=1e-13)
