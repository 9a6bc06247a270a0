"""bfloat16 autocast on CPU (issue #14): the fast models and ``accelerate()``d nextrec models under
``torch.autocast("cpu", dtype=torch.bfloat16)`` keep float32 weights, run every GEMM in bfloat16,
and are as close to the float64 truth as the plain model under the same autocast.

The band, per output, gradient and BatchNorm buffer (``assert_as_accurate`` with a per-tensor
floor): the fast error from float64 at most 10x the worst of ten plain bfloat16 runs plus 2^-4 of
that tensor's largest entry and 2^-8 of the largest entry of all (tensors that are ~0 in float64,
such as a Linear bias before train-mode BatchNorm, are rounding noise in every run). The fast
path may round differently (GEMMs grouped, one per layer rather than per expert; the gate mixture
a bmm where nextrec multiplies and sums; pooling in float32, where nextrec's mean pooling is a
bf16 bmm), not worse.

Why so many plain runs, 256 rows and that floor: bfloat16 keeps 8 bits, and which side of an
activation's kink a row near it lands on (ReLU, a tower's output ReLU) is rounding's coin flip,
in the plain model as in the fast one but not alike. With 32 rows and two plain runs the test
failed 4 draws in 1080: one row flipped moved a gradient by 2-16% of its size (MMOE seed 950131:
expert gradients 35x plain's error, and bit for bit plain's when the fast model mixed its
experts by multiply-and-sum; the 0.6-API drop-in ESMM, seed 2119450: plain with our embedding
layer as accurate as plain, the fast model's more exact float32 pooling put a row on the other
side). The ten runs (rows as given, ``flip_rows``, eight with every weight moved by up to 2^-8,
the step autocast's own cast rounds to) sample that luck; 256 rows make one row's flip ~1/256 of a gradient; 2^-4
of a tensor's size covers the rest. Draws where plain bf16 itself is more than ``ILL_POSED`` of a
tensor's size off float64 (tiny random layers under train-mode BatchNorm: about a third of the
draws here) are skipped, naming the tensor: nothing can be judged against such a yardstick.

Measured over 3060 draws on 0.3.1 (all flavours) and 2880 on 0.6.14 (accelerated): 2069 skipped
as ill-posed, no failure, the worst judged draw at 0.12 of the band. What it catches (90 draws,
a third skipped): one gradient tensor scaled by 1.3 / 2 in 41 / 50 of 57 judged draws; the bug
it found (LayerNorm normalised in bfloat16 before its float32 affine, gradients 10x their size) in draws
with 2-channel LayerNorms. Exact math is the float32 / float64 parity tests' job.

Seeds are fresh each run and printed; NEXTREC_FAST_TEST_SEED replays a run.
"""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch

from model_pairs import FLAVOURS, KINDS, constructors, output_of
from nextrec_fast.bench import gemm_floor
from nextrec_generation import assert_as_accurate, case_seed, flip_rows, plain_errors, skip_if_rows_collapse
from test_model_parity import perturb_batchnorm

RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))
BATCH = 256  # BatchNorm statistics over 256 rows (module docstring)
ILL_POSED = 0.25  # plain bf16 error / the tensor's largest entry above which a draw is skipped
RELATIVE_FLOOR = 2**-4  # of each tensor's largest entry (module docstring)
NOISE_FLOOR = 2**-8  # of the largest entry of all: bf16 resolution, for tensors ~0 in float64
BAND = dict(relative_floor=RELATIVE_FLOOR, noise_floor=NOISE_FLOOR)  # assert_as_accurate's factor stays 10
JITTERED = 8  # plain runs with weights moved by up to a bfloat16 rounding step (module docstring)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _seed(*parts) -> int:
    return case_seed(RUN_SEED, *parts)  # RUN_SEED looked up at call time (stress runs set it)


def _models(flavour: str, kind: str, seed: int):
    """(plain, fast, x): float32 models with the same weights (BatchNorm statistics perturbed)."""
    plain_ctor, fast_ctor, inputs = constructors(flavour, kind, seed, batch=BATCH)
    torch.manual_seed(seed)
    plain = plain_ctor()
    perturb_batchnorm(plain)
    fast = fast_ctor()
    fast.load_state_dict(plain.state_dict(), strict=True)
    return plain, fast, inputs(plain)


def _run(model, x, autocast: bool, flipped: bool = False):
    """(output [B, T] as float32/64, {name: grad}) after one backward of a fixed weighted sum."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = output_of(model, flip_rows(x)).flip(0) if flipped else output_of(model, x)
        out = out.to(torch.float64 if not autocast else torch.float32)
        loss = (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss.backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _jittered(model, seed: int):
    """A copy of ``model`` with every float32 weight scaled by (1 + u), |u| < 2^-8."""
    copy_ = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy_.parameters():
            p.mul_(1 + (torch.rand(p.shape, generator=gen) * 2 - 1) * 2.0**-8)
    return copy_


def _skip_if_ill_posed(plain_runs: list[dict], truth: dict) -> None:
    """Skip a draw bfloat16 cannot represent: the plain model itself, under the same autocast, off
    float64 by more than ``ILL_POSED`` of a tensor's largest entry (seen: nextrec 0.3's 1e-4-sized
    embeddings under train-mode BatchNorm, gradients ~1e4 that plain bf16 got 75% wrong)."""
    errors = plain_errors(plain_runs, truth)
    sizes = {n: truth[n].abs().max().item() for n in errors}
    scale = max(sizes.values(), default=0.0)
    worst = (0.0, None)
    for name, err in errors.items():
        # Tensors ~0 in float64 (a Linear bias before train-mode BatchNorm) are rounding noise in any run.
        if sizes[name] > 1e-3 * scale and err / sizes[name] > worst[0]:
            worst = (err / sizes[name], name)
    if worst[0] > ILL_POSED:
        pytest.skip(f"ill-posed draw for bfloat16: the plain model under autocast is {worst[0]:.0%} of {worst[1]}'s "
                    "largest entry off float64; no comparison with it can judge the fast path")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bfloat16_as_accurate_as_plain(flavour, kind, mode):
    """Output, every gradient and (train) the BatchNorm running statistics."""
    seed = _seed(flavour, kind, mode)
    plain, fast, x = _models(flavour, kind, seed)
    truth = copy.deepcopy(plain).double()
    plains = [(plain, False), (copy.deepcopy(plain), True)] + [(_jittered(plain, seed + j), False)
                                                               for j in range(JITTERED)]
    for m in [fast, truth] + [m for m, _ in plains]:
        m.train(mode == "train")
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    skip_if_rows_collapse(truth, lambda m: output_of(m, x64), mode)
    out_truth, g_truth = _run(truth, x64, autocast=False)
    runs = [_run(m, x, autocast=True, flipped=flipped) for m, flipped in plains]
    out_fast, g_fast = _run(fast, x, autocast=True)
    _skip_if_ill_posed([{"output": out, **g} for out, g in runs], {"output": out_truth, **g_truth})
    assert out_fast.shape == out_truth.shape and torch.isfinite(out_fast).all()
    assert all(p.dtype == torch.float32 for p in fast.parameters()), "autocast must keep float32 weights"
    assert_as_accurate({"output": out_fast}, [{"output": out} for out, _ in runs], {"output": out_truth},
                       what="output", **BAND)
    for name, g in runs[0][1].items():
        if g is None:
            assert g_fast[name] is None or not g_fast[name].any(), name
    assert_as_accurate(g_fast, [g for _, g in runs], g_truth, **BAND)
    buffers = [dict(m.named_buffers()) for m, _ in plains]  # the weights are not moved by a forward
    floats = [n for n, b in buffers[0].items() if b.is_floating_point()]
    fast_buffers, truth_buffers = dict(fast.named_buffers()), dict(truth.named_buffers())
    assert_as_accurate({n: fast_buffers[n] for n in floats}, [{n: b[n] for n in floats} for b in buffers],
                       {n: truth_buffers[n] for n in floats}, what="buffer", **BAND)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_gemms(flavour, kind):
    """Under autocast every GEMM of the fast model's forward and backward runs in bfloat16 (AMX
    where the CPU has it), as in the plain model. (GEMMs only: the fast model's gate mixture is a
    bmm where the plain one multiplies and sums, so their GEMM FLOPs differ by 2·B·E·N per task.)"""
    seed = _seed(flavour, kind)
    plain, fast, x = _models(flavour, kind, seed)
    for name, model in (("plain", plain), ("fast", fast)):
        model.train()
        calls = gemm_floor.record_gemms(lambda: _run(model, x, autocast=True))
        assert calls, f"{name}: no GEMM recorded"
        dtypes = {a.dtype for c in calls for a in c.args if isinstance(a, gemm_floor._TensorSpec)}
        assert dtypes == {torch.bfloat16}, f"{name} GEMM operand dtypes under autocast: {dtypes}"


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_model_runs(kind):
    """A fast model converted with ``.bfloat16()`` (no autocast: bfloat16 weights and BatchNorm
    buffers) trains and predicts like the plain model converted alike: its bfloat16 BatchNorm
    layers take the PyTorch path, not the C++ op, which takes bfloat16 activations with float32
    parameters only (a review found the op path raising TypeError there). nextrec 0.3's models
    only: 0.6's hard-code ``.float()`` on dense inputs, so neither 0.6 model runs converted."""
    plain, fast, x = _models("standalone", kind, _seed("bf16_model", kind))
    plain.bfloat16()
    fast.bfloat16()
    x = {k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()}
    for mode in ("train", "eval"):
        grads = []
        for model in (plain, fast):
            model.train(mode == "train")
            model.zero_grad(set_to_none=True)
            out = output_of(model, x)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), mode
            out.float().sum().backward()
            grads.append({n for n, p in model.named_parameters() if p.grad is not None})
        assert grads[1] == grads[0], f"{mode}: gradients for {sorted(grads[1] ^ grads[0])[:3]} differ in presence"
