"""The C++ batch_norm_act op against PyTorch (Linear bias + BatchNorm1d + ReLU), float64, float32 and bfloat16."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nextrec_fast.ops import batch_norm_act as op
from nextrec_generation import assert_as_accurate

pytestmark = pytest.mark.skipif(not op.is_available(), reason="nextrec_fast C++ extension not built")


def reference(x2d, linear_bias, weight, bias, running_mean, running_var, training, eps, relu):
    """What nextrec's MLP computes after a bias-free GEMM: (x + b) -> BatchNorm1d -> ReLU."""
    z = x2d + linear_bias if linear_bias is not None else x2d
    y = F.batch_norm(z, running_mean, running_var, weight, bias, training, 0.0, eps)
    return torch.relu(y) if relu else y


def to_layout(t2d, experts, expert_major):
    """[B, E*N] -> [E, B, N] (contiguous) if expert_major."""
    if not expert_major:
        return t2d
    batch = t2d.shape[0]
    return t2d.reshape(batch, experts, -1).transpose(0, 1).contiguous()


def from_layout(t, experts, expert_major):
    return t.transpose(0, 1).reshape(t.shape[1], -1) if expert_major else t


def poison_allocator(numel, dtype):
    """Leave NaN in memory the op's next allocations are likely to reuse."""
    junk = torch.full((numel,), float("nan"), dtype=dtype)
    del junk


def random_case(gen, dtype, experts, batch, width, affine=True, with_linear_bias=True):
    c = experts * width
    x = torch.randn(batch, c, generator=gen, dtype=dtype) * 2 + torch.randn(c, generator=gen, dtype=dtype)
    linear_bias = torch.randn(c, generator=gen, dtype=dtype) if with_linear_bias else None
    weight = (torch.rand(c, generator=gen, dtype=dtype) + 0.5) if affine else None
    bias = torch.randn(c, generator=gen, dtype=dtype) * 0.5 if affine else None
    running_mean = torch.randn(c, generator=gen, dtype=dtype) * 0.5
    running_var = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    return x, linear_bias, weight, bias, running_mean, running_var


CASES = list(itertools.product([True, False], [True, False], [False, True], [False, True]))


@pytest.mark.parametrize("training,relu,x_expert_major,out_expert_major", CASES)
# (4, 300, 130): 20 blocks of 32 channels, block by block at up to 5 threads (see below)
@pytest.mark.parametrize("shape", [(3, 17, 5), (8, 64, 40), (1, 33, 100), (2, 2, 70), (4, 300, 130)])
def test_matches_pytorch_float64(training, relu, x_expert_major, out_expert_major, shape):
    experts, batch, width = shape
    gen = torch.Generator().manual_seed(hash((training, relu, x_expert_major, out_expert_major, shape)) % 2**31)
    x, lb, w, b, rm, rv = random_case(gen, torch.float64, experts, batch, width)
    ref_inputs = [t.clone().requires_grad_() for t in (x, lb, w, b)]
    expected = reference(*ref_inputs, rm, rv, training, 1e-5, relu)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad)

    inputs = [t.clone().requires_grad_() for t in (x, lb, w, b)]
    poison_allocator(x.numel(), x.dtype)
    out, mean_x, var = op.batch_norm_act(to_layout(inputs[0], experts, x_expert_major), experts=experts,
                                         linear_bias=inputs[1], weight=inputs[2], bias=inputs[3], running_mean=rm,
                                         running_var=rv, training=training, eps=1e-5, relu=relu,
                                         out_expert_major=out_expert_major)
    assert out.shape == ((experts, batch, width) if out_expert_major else (batch, experts * width))
    got = from_layout(out, experts, out_expert_major)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, inputs, grad)
    for name, g, e in zip(["x", "linear_bias", "weight", "bias"], grads, expected_grads):
        # The linear bias's true gradient under batch statistics is zero: both are rounding noise.
        atol = 1e-9 * grad.abs().max().item() * batch if (name == "linear_bias" and training) else 1e-11
        torch.testing.assert_close(g, e, rtol=1e-10, atol=atol, msg=lambda m: f"{name}: {m}")
    assert mean_x.dtype == var.dtype == torch.float64
    if training:
        torch.testing.assert_close(mean_x, x.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, x.var(0, unbiased=False), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(mean_x, rm - lb, rtol=0, atol=0)
        torch.testing.assert_close(var, rv, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu,with_bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("groups,out_expert_major", [(1, False), (1, True), (3, True), (6, False)])
def test_bias_act_is_relu_of_x_plus_bias_exactly(dtype, relu, with_bias, groups, out_expert_major):
    """``bias_act`` (the op with identity statistics) equals ``torch.relu(x + b)`` bit for bit in
    float32 and float64, in every input layout ([B, C]; [G, B, M*N] with G = 3 groups and with
    G = E, i.e. [E, B, N]) and both output layouts, with NaN, +-inf and exact zeros in x; the
    input gradient equals ReLU's exactly, and the bias gradient is the row sum (within float
    rounding of it: the op accumulates in double)."""
    seed = 1000 * groups + 10 * relu + with_bias + int(out_expert_major) + (dtype == torch.float64)
    gen = torch.Generator().manual_seed(seed)
    experts, batch, width = 6, 37, 9
    x = torch.randn(batch, experts * width, generator=gen, dtype=dtype)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = float("nan"), float("inf"), -float("inf"), 0.0
    lb = torch.randn(experts * width, generator=gen, dtype=dtype) if with_bias else None
    x[4, 4] = -lb[4] if with_bias else 0.0  # x + b exactly 0
    leaf = x.clone().requires_grad_()
    lb_leaf = lb.clone().requires_grad_() if with_bias else None
    z = leaf + lb_leaf if with_bias else leaf
    expected = torch.relu(z) if relu else z
    per_group = experts // groups
    laid = x if groups == 1 else x.view(batch, groups, per_group * width).transpose(0, 1).contiguous()
    laid = laid.requires_grad_()
    poison_allocator(batch * experts * width, dtype)
    out = op.bias_act(laid, experts=experts, linear_bias=lb_leaf, relu=relu, out_expert_major=out_expert_major)
    got = from_layout(out, experts, out_expert_major)
    assert torch.equal(got.isnan(), expected.isnan()), f"seed {seed}"
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()), f"seed {seed}"
    g = torch.randn(expected.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, [laid] + ([lb_leaf] if with_bias else []), to_layout(g, experts, out_expert_major))
    want = torch.autograd.grad(expected, [leaf] + ([lb_leaf] if with_bias else []), g)
    grad_x = grads[0] if groups == 1 else grads[0].transpose(0, 1).reshape(batch, -1)
    assert torch.equal(grad_x, want[0]), f"seed {seed}"  # NaN and infinite z too: ReLU's mask is z <= 0
    if with_bias:
        truth = want[0].double().sum(0)
        torch.testing.assert_close(grads[1].double(), truth, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12, msg=lambda m: f"{m} (seed {seed})")


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_grouped_input_layout(groups):
    """x as [G, B, M*N]: G groups of M experts (one bmm over groups of experts sharing an input)."""
    gen = torch.Generator().manual_seed(groups)
    experts, batch, width = 6, 24, 10
    x, lb, w, b, _, _ = random_case(gen, torch.float64, experts, batch, width)
    xs = x.clone().requires_grad_()
    expected = reference(xs, lb, w, b, None, None, True, 1e-5, True)
    per_group = experts // groups
    grouped = x.view(batch, groups, per_group * width).transpose(0, 1).contiguous().requires_grad_()
    out, _, _ = op.batch_norm_act(grouped, experts=experts, linear_bias=lb, weight=w, bias=b, running_mean=None,
                                  running_var=None, training=True, eps=1e-5, relu=True, out_expert_major=True)
    torch.testing.assert_close(from_layout(out, experts, True), expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (grad_grouped,) = torch.autograd.grad(out, grouped, to_layout(g, experts, True))
    (grad_expected,) = torch.autograd.grad(expected, xs, g)
    assert grad_grouped.shape == grouped.shape
    torch.testing.assert_close(grad_grouped.transpose(0, 1).reshape(batch, -1), grad_expected, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("affine,with_linear_bias", [(False, True), (True, False), (False, False)])
def test_optional_parameters(affine, with_linear_bias):
    gen = torch.Generator().manual_seed(3)
    x, lb, w, b, rm, rv = random_case(gen, torch.float64, 4, 16, 8, affine=affine, with_linear_bias=with_linear_bias)
    xs = x.clone().requires_grad_()
    expected = reference(xs, lb, w, b, None, None, True, 1e-5, True)
    xf = x.clone().requires_grad_()
    out, _, _ = op.batch_norm_act(xf, experts=4, linear_bias=lb, weight=w, bias=b, running_mean=None,
                                  running_var=None, training=True, eps=1e-5, relu=True, out_expert_major=False)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(out, xf, g)[0], torch.autograd.grad(expected, xs, g)[0],
                               rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("first_row", ["typical", "outlier"])
def test_float32_at_least_as_accurate_as_pytorch(first_row):
    """float32: as close to the float64 result as PyTorch's float32 BatchNorm, or closer (the
    statistics and the input gradient are formed in double). ``outlier``: row 0 far from the
    rest, as after a saturating activation in a small batch; statistics shifted by the first
    row lost up to 30x PyTorch's accuracy there (a PLE run, test_nextrec_compat)."""
    gen = torch.Generator().manual_seed(7)
    for batch in (2, 3, 8, 17, 256):
        x, lb, w, b, rm, rv = random_case(gen, torch.float64, 2, batch, 24)
        x = x * 0.01  # a spread far below the bias: cancellation-prone, as after a Linear
        if first_row == "outlier":
            x[0] += 1.5 * torch.sign(torch.randn(48, generator=gen, dtype=torch.float64))
        grad = torch.randn(batch, 48, generator=gen, dtype=torch.float64)

        def run(fn, dtype):
            ts = [t.to(dtype).requires_grad_() for t in (x, lb, w, b)]
            y = fn(ts)
            return [y.detach().double()] + [g.double() for g in torch.autograd.grad(y, ts, grad.to(dtype))]

        exact = run(lambda t: reference(*t, None, None, True, 1e-5, True), torch.float64)
        torch32 = run(lambda t: reference(*t, None, None, True, 1e-5, True), torch.float32)
        ours = run(lambda t: op.batch_norm_act(t[0], experts=2, linear_bias=t[1], weight=t[2], bias=t[3],
                                               running_mean=None, running_var=None, training=True, eps=1e-5,
                                               relu=True, out_expert_major=False)[0], torch.float32)
        for name, e, p, o in zip(["out", "x", "linear_bias", "weight", "bias"], exact, torch32, ours):
            err_ours, err_torch = (o - e).abs().max().item(), (p - e).abs().max().item()
            scale = e.abs().max().item() + grad.abs().max().item()
            # 1e-7 of the scale: room for a value near 0 where PyTorch happens to round exactly
            assert err_ours <= 2 * err_torch + 1e-7 * scale, f"batch {batch} {name}: {err_ours:.3g} vs {err_torch:.3g}"


@pytest.mark.parametrize("training,relu", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape,x_expert_major,out_expert_major", [
    ((3, 17, 5), False, False), ((8, 64, 40), True, False), ((2, 300, 24), False, True), ((4, 2, 6), True, True)])
def test_bfloat16_as_accurate_as_pytorch_autocast(training, relu, shape, x_expert_major, out_expert_major):
    """A bfloat16 x (what autocast's GEMMs give) with float32 parameters: the output and x's
    gradient in bfloat16, the parameters' gradients in float32, as close to float64 as PyTorch's
    own BatchNorm1d + ReLU under bfloat16 autocast (within 2x: both round each value to
    bfloat16 once; ours computes in float32 and double, PyTorch in float32)."""
    experts, batch, width = shape
    gen = torch.Generator().manual_seed(hash((training, relu, shape)) % 2**31)
    x, lb, w, b, rm, rv = random_case(gen, torch.float32, experts, batch, width)
    x = x.bfloat16()  # the values all three runs see
    grad = torch.randn(batch, experts * width, generator=gen).bfloat16()

    def run(fn, dtype):
        x_ = x.to(dtype).requires_grad_()
        params = [t.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_() for t in (lb, w, b)]
        y = fn(x_, *params)
        grads = torch.autograd.grad(y, [x_, *params], grad.to(y.dtype))
        return {"out": y.detach().double(), **{n: g.double() for n, g in zip(["x", "lb", "w", "b"], grads)}}, y, grads

    def pytorch(x_, lb_, w_, b_):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x_.dtype == torch.bfloat16):
            # nextrec's MLP: the Linear's bias is added inside its bfloat16 GEMM, then BatchNorm1d
            z = (x_ + lb_).to(x_.dtype)
            y = F.batch_norm(z, rm.to(lb_.dtype), rv.to(lb_.dtype), w_, b_, training, 0.0, 1e-5)
            return torch.relu(y) if relu else y

    def ours(x_, lb_, w_, b_):
        poison_allocator(x_.numel(), x_.dtype)
        out, _, _ = op.batch_norm_act(to_layout(x_, experts, x_expert_major), experts=experts, linear_bias=lb_,
                                      weight=w_, bias=b_, running_mean=rm, running_var=rv, training=training,
                                      eps=1e-5, relu=relu, out_expert_major=out_expert_major)
        return from_layout(out, experts, out_expert_major)

    truth, _, _ = run(pytorch, torch.float64)
    plain, y_plain, _ = run(pytorch, torch.bfloat16)
    got, y, grads = run(ours, torch.bfloat16)
    assert y.dtype == y_plain.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 3
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)  # no poison read back
    assert_as_accurate(got, plain, truth, factor=2.0)


@pytest.mark.parametrize("training", [True, False])
def test_bfloat16_is_the_float32_op_rounded_once(training):
    """A bfloat16 x holds float32-exact values, and the bfloat16 path computes in float32 (and
    double) like the float32 path: its output and x's gradient are the float32 op's rounded to
    bfloat16, bit for bit, and the weight and bias gradients equal. (The linear bias's gradient
    sums the rounded input gradient: not compared.) A dropped term or a wrong rounding shows
    here even where it hides inside bfloat16's error from float64."""
    experts, batch, width = 4, 300, 24
    gen = torch.Generator().manual_seed(21 + training)
    x, lb, w, b, rm, rv = random_case(gen, torch.float32, experts, batch, width)
    x = x.bfloat16()
    grad = torch.randn(batch, experts * width, generator=gen).bfloat16()
    results = []
    for x_ in (x, x.float()):
        xs = x_.clone().requires_grad_()
        params = [t.clone().requires_grad_() for t in (lb, w, b)]
        out, _, _ = op.batch_norm_act(xs, experts=experts, linear_bias=params[0], weight=params[1], bias=params[2],
                                      running_mean=rm, running_var=rv, training=training, eps=1e-5, relu=True,
                                      out_expert_major=False)
        results.append((out, *torch.autograd.grad(out, [xs, *params], grad.to(out.dtype))))
    (out16, gx16, _, gw16, gb16), (out32, gx32, _, gw32, gb32) = results
    assert torch.equal(out16, out32.bfloat16())
    assert torch.equal(gx16, gx32.bfloat16())
    assert torch.equal(gw16, gw32) and torch.equal(gb16, gb32)


def test_bfloat16_rounding_edge_cases():
    """The output's rounding to bfloat16 is torch's (nearest, ties to even; overflow to inf; NaN
    stays NaN), on values chosen for it: x = 0 in eval mode with unit statistics gives out = bias."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF,  # ties to even, above, below
                         0x7F7F7FFF, 0x7F7F8000, 0x7F800000, 0xFF800000,  # largest finite, overflow, +-inf
                         0x7FC00001, 0x00000001, 0x80400000, 0x00000000], dtype=torch.int64)
    bias = bits.to(torch.int32).view(torch.float32)
    c = bias.numel()
    out, _, _ = op.batch_norm_act(torch.zeros(3, c, dtype=torch.bfloat16), experts=1, linear_bias=None,
                                  weight=torch.ones(c), bias=bias, running_mean=torch.zeros(c),
                                  running_var=torch.ones(c), training=False, eps=0.0, relu=False,
                                  out_expert_major=False)
    expected = bias.bfloat16().expand(3, c)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def test_relu_mask_matches_forward_exactly():
    """The backward recomputes the ReLU mask: it must agree with the forward's output bit for bit,
    including values that round to zero."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 96, generator=gen)
    weight = torch.ones(96)
    bias = torch.zeros(96)
    x[:, :8] = 0.0  # zero-variance channels: z == bias exactly
    xs = x.clone().requires_grad_()
    out, _, _ = op.batch_norm_act(xs, experts=3, linear_bias=None, weight=weight, bias=bias, running_mean=None,
                                  running_var=None, training=True, eps=1e-5, relu=True, out_expert_major=False)
    g = torch.ones_like(out)
    (grad_x,) = torch.autograd.grad(out, xs, g)
    # Channels with a zero output everywhere get no gradient from dz; elsewhere the mask is out > 0.
    dead = (out == 0).all(0)
    assert dead[:8].all()
    torch.testing.assert_close(grad_x[:, dead], torch.zeros_like(grad_x[:, dead]))


def test_deterministic_and_thread_count_independent():
    gen = torch.Generator().manual_seed(5)
    x, lb, w, b, _, _ = random_case(gen, torch.float32, 8, 300, 32)
    g = torch.randn(300, 256, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            xs = x.clone().requires_grad_()
            out, mean, var = op.batch_norm_act(xs, experts=8, linear_bias=lb, weight=w, bias=b, running_mean=None,
                                               running_var=None, training=True, eps=1e-5, relu=True,
                                               out_expert_major=True)
            (gx,) = torch.autograd.grad(out, xs, g.view(300, 8, 32).transpose(0, 1).contiguous())
            results.append((out, mean, var, gx))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training,relu", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("x_expert_major,out_expert_major", [(False, False), (True, True), (False, True), (True, False)])
def test_column_blocks_and_passes_give_the_same_bits(dtype, training, relu, x_expert_major, out_expert_major):
    """With at least 4 blocks of 32 channels per thread the kernels run block by block (all rows
    of a block, then the next; ``by_column_blocks`` in csrc/batch_norm_act.cpp), with fewer pass
    by pass over row chunks. Same arithmetic per channel, so the same bits: 2 experts x 80
    channels (6 blocks, the last ragged) run block by block at 1 thread and pass by pass at 2 or
    more. Batches of 300 and 1000 rows (several row chunks; at 1000 several flushes into double
    per chunk) and 5 (one chunk), with and without the affine parameters and the linear bias."""
    gen = torch.Generator().manual_seed(11)
    threads = torch.get_num_threads()
    for batch, affine in ((300, True), (1000, True), (5, True), (300, False)):
        x, lb, w, b, rm, rv = random_case(gen, torch.float64, 2, batch, 80, affine=affine, with_linear_bias=affine)
        param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        lb, w, b, rm, rv = (t.to(param_dtype) if t is not None else None for t in (lb, w, b, rm, rv))
        x = to_layout(x.to(dtype), 2, x_expert_major)
        g = torch.randn((2, batch, 80) if out_expert_major else (batch, 160), generator=gen).to(dtype)
        results = []
        try:
            for n in (1, max(2, threads)):
                torch.set_num_threads(n)
                assert torch.get_num_threads() == n  # else both runs would take the same path
                ts = [t.clone().requires_grad_() if t is not None else None for t in (x, lb, w, b)]
                out, mean, var = op.batch_norm_act(ts[0], experts=2, linear_bias=ts[1], weight=ts[2], bias=ts[3],
                                                   running_mean=rm, running_var=rv, training=training, eps=1e-5,
                                                   relu=relu, out_expert_major=out_expert_major)
                wanted = [t for t in ts if t is not None]
                results.append((out, mean, var) + torch.autograd.grad(out, wanted, g))
        finally:
            torch.set_num_threads(threads)
        for i, (blocks, passes) in enumerate(zip(*results)):
            assert torch.equal(blocks, passes), f"batch {batch}, affine {affine}: result {i} differs"


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    for training, relu, out_em in itertools.product([True, False], [True, False], [True, False]):
        x, lb, w, b, rm, rv = random_case(gen, torch.float64, 3, 12, 4)
        args = (x.requires_grad_(), lb.requires_grad_(), w.requires_grad_(), b.requires_grad_(), rm, rv, 3, training,
                1e-5, relu, out_em)
        torch.library.opcheck(torch.ops.nextrec_fast.batch_norm_act_forward.default, args)
    x, lb, w, b, rm, rv = random_case(gen, torch.float32, 3, 12, 4)  # bfloat16 x, float32 parameters
    for training in (True, False):
        args = (x.bfloat16().requires_grad_(), lb.requires_grad_(), w.requires_grad_(), b.requires_grad_(), rm, rv, 3,
                training, 1e-5, True, False)
        torch.library.opcheck(torch.ops.nextrec_fast.batch_norm_act_forward.default, args)


def test_bias_act_opcheck_and_gradgradcheck():
    """``bias_act_forward``'s schema, fake, autograd registration (``opcheck``), and its first
    derivative differentiable again (float64 ``gradgradcheck``: the ``create_graph`` backward), in
    every input / output layout, with ReLU and the identity, with and without the bias."""
    gen = torch.Generator().manual_seed(5)
    experts, batch, width = 4, 6, 3
    base = torch.randn(batch, experts * width, generator=gen, dtype=torch.float64)
    base[base.abs() < 0.05] = 0.3  # away from ReLU's kink, where finite differences straddle it
    bias = torch.randn(experts * width, generator=gen, dtype=torch.float64)
    cases = itertools.product([1, "1x", 2, 4], [True, False], [True, False], [True, False])
    for groups, relu, out_em, with_bias in cases:
        if groups == "1x":  # [1, B, C]: one group (one "expert" bmm's output), not [B, C]
            x = base.unsqueeze(0)
        else:
            x = base if groups == 1 else base.view(batch, groups, -1).transpose(0, 1).contiguous()
        lb = bias.clone().requires_grad_() if with_bias else None
        torch.library.opcheck(torch.ops.nextrec_fast.bias_act_forward.default,
                              (x.clone().requires_grad_(), lb, experts, relu, out_em))

        def fn(x, *given):
            return op.bias_act(x, experts=experts, linear_bias=given[0] if given else None, relu=relu,
                               out_expert_major=out_em)
        inputs = (x.clone().requires_grad_(), *([bias.clone().requires_grad_()] if with_bias else []))
        assert torch.autograd.gradgradcheck(fn, inputs), (groups, relu, out_em, with_bias)
    x = base.float().bfloat16().requires_grad_()  # bfloat16 x, float32 bias (autocast's layout)
    torch.library.opcheck(torch.ops.nextrec_fast.bias_act_forward.default,
                          (x, bias.float().requires_grad_(), experts, True, False))


def test_bias_act_keeps_only_its_output_for_backward():
    """Under autograd ``bias_act`` saves its output alone (ReLU's mask comes from it), not its
    input: the next layer's GEMM saves that output too, so a layer costs one activation."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 12, generator=gen, requires_grad=True)
    bias = torch.randn(12, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = op.bias_act(x * 1, experts=3, linear_bias=bias, relu=True, out_expert_major=True)
    own = [t for t in saved if t.data_ptr() != x.data_ptr()]  # x * 1 saves nothing; the op's own tensors
    assert len(own) == 1 and own[0].data_ptr() == out.data_ptr() and own[0].shape == out.shape, \
        [(t.shape, t.data_ptr()) for t in saved]


def test_compiles_fullgraph():
    gen = torch.Generator().manual_seed(9)
    x, lb, w, b, _, _ = random_case(gen, torch.float32, 4, 32, 8)

    def f(x, lb, w, b):
        out, _, _ = op.batch_norm_act(x, experts=4, linear_bias=lb, weight=w, bias=b, running_mean=None,
                                      running_var=None, training=True, eps=1e-5, relu=True, out_expert_major=True)
        return out.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(compiled(xc, lb, w, b), f(xs, lb, w, b))
    compiled(xc, lb, w, b).backward()
    f(xs, lb, w, b).backward()
    torch.testing.assert_close(xc.grad, xs.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(4, 6, dtype=torch.int64)), "float32, float64 or bfloat16"),
    (dict(x=torch.zeros(4, 6, dtype=torch.float16)), "float32, float64 or bfloat16"),
    (dict(x=torch.zeros(4, 6, dtype=torch.bfloat16), weight=torch.ones(6, dtype=torch.bfloat16)),
     "weight is BFloat16 but must be Float for x of BFloat16"),
    (dict(x=torch.zeros(4, 7)), "do not split into 3 experts"),
    (dict(x=torch.zeros(2, 4, 2)), "G=2, which does not divide experts=3"),
    (dict(weight=torch.ones(5)), r"weight must be \[6\]"),
    (dict(weight=torch.ones(6, dtype=torch.float64)), "weight is Double but must be Float for x of Float"),
    (dict(x=torch.zeros(1, 6)), "more than one sample"),
    (dict(training=False), "running_mean and running_var are needed"),
])
def test_bad_input(bad, match):
    args = dict(x=torch.randn(4, 6), experts=3, linear_bias=None, weight=torch.ones(6), bias=torch.zeros(6),
                running_mean=None, running_var=None, training=True, eps=1e-5, relu=True, out_expert_major=False)
    args.update(bad)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op.batch_norm_act(**args)


def test_output_buffers_reused_only_when_unreferenced():
    """Large outputs come from a pool of storages the op returned before: never one still
    referenced by a tensor or a view, and the values are always fresh. (data_ptr, not
    untyped_storage(): a storage's Python object, once created, keeps its use count up.)"""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(1024, 512, generator=gen)  # 2 MiB outputs: pooled
    w, b = torch.ones(512), torch.zeros(512)

    def run(scale):
        out, _, _ = op.batch_norm_act(x * scale, experts=4, linear_bias=None, weight=w, bias=b, running_mean=None,
                                      running_var=None, training=True, eps=1e-5, relu=False, out_expert_major=False)
        return out

    expected = reference(x, None, w, b, None, None, True, 1e-5, False)
    first = run(1.0)
    second = run(1.0)
    assert second.data_ptr() != first.data_ptr()
    view = second[:2]
    del second
    third = run(1.0)  # `second` is gone but its storage lives on in `view`
    assert third.data_ptr() not in (first.data_ptr(),
                                                     view.data_ptr())
    for t in (first, third):
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-5)
    del first
    pointers = set()
    for scale in (1.0, 2.0, 3.0):  # a buffer freed each time is reused each time
        fourth = run(scale)
        pointers.add(fourth.data_ptr())
        assert fourth.data_ptr() not in (view.data_ptr(),
                                                          third.data_ptr())
        torch.testing.assert_close(fourth, expected, rtol=1e-5, atol=1e-5)  # BatchNorm: scale-free
        del fourth
    assert len(pointers) == 1
    torch.testing.assert_close(view, expected[:2], rtol=1e-5, atol=1e-5)  # untouched


def test_inference_call_skips_autograd_but_training_call_records_it():
    """Without anything to differentiate the wrapper calls the kernel below the Autograd key;
    the results must be the same bits, and inputs that need a gradient must still get a graph."""
    gen = torch.Generator().manual_seed(11)
    x, lb, w, b, rm, rv = random_case(gen, torch.float64, 3, 6, 5)
    kwargs = dict(experts=3, running_mean=None, running_var=None, training=True, eps=1e-5, relu=True,
                  out_expert_major=False)
    plain = op.batch_norm_act(x, linear_bias=lb, weight=w, bias=b, **kwargs)
    assert all(t.grad_fn is None and not t.requires_grad for t in plain)
    params = [t.clone().requires_grad_() for t in (x, lb, w, b)]
    with torch.no_grad():
        below = op.batch_norm_act(params[0], linear_bias=params[1], weight=params[2], bias=params[3], **kwargs)
    assert all(t.grad_fn is None for t in below)
    trained = op.batch_norm_act(params[0], linear_bias=params[1], weight=params[2], bias=params[3], **kwargs)
    assert trained[0].requires_grad and trained[0].grad_fn is not None
    for a, c, d in zip(plain, below, trained):
        torch.testing.assert_close(c, a, rtol=0, atol=0)
        torch.testing.assert_close(d.detach(), a, rtol=0, atol=0)
    trained[0].sum().backward()
    assert all(p.grad is not None for p in params)
