"""The CUDA pooling code, run on the CPU.

csrc/pooled_embedding_cuda.cu is compiled here as plain C++ with csrc/cuda_emulation.h (every
(block, thread) of a launch runs in turn, blocks in reverse order) and registered for CPU tensors
as torch.ops.nextrec_fast_emu. Its kernels keep threads independent (no shared memory, barriers
or shuffles), so this executes the GPU's code: the lane loops and index math of the forward, the
atomic and the deterministic sort-and-reduce backward, the per-id weight gradient, the
device-side id and offset checks and how the host code turns them into Python errors. What it
cannot show: races, memory coalescing, speed (benchmarks/gpu_check.sh, on a GPU).

Compared against nextrec's formulas in float64 (the reference of test_pooled_embedding.py) and
against the CPU op, on fresh random feature mixes.
"""
from __future__ import annotations

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
    wrapper = out / "pooled_embedding_cuda_emulated.cpp"
    wrapper.write_text(f'#include "{CSRC / "pooled_embedding_cuda.cu"}"\n')
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    flags = ["-O1", "-std=c++20", "-fPIC", "-fopenmp", "-DNEXTREC_FAST_CUDA_EMULATION",
             "-DNEXTREC_FAST_OP_NAMESPACE=nextrec_fast_emu", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *includes]
    jobs = [subprocess.Popen(["g++", *flags, *extra, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for src, obj, extra in ((CSRC / "pooled_embedding.cpp", out / "a.o", []),
                                    (wrapper, out / "b.o", ["-x", "c++"]))]
    for job in jobs:
        log = job.communicate(timeout=600)[0]
        assert job.returncode == 0, log[-4000:]
    lib = out / "libnextrec_fast_cuda_emulated.so"
    link = ["g++", "-shared", str(out / "a.o"), str(out / "b.o"), "-o", str(lib), "-fopenmp",
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
