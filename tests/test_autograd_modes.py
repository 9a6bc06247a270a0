"""Autograd modes through the fast models: ``torch.inference_mode``, double backward
(``create_graph=True``), forward-mode AD and ``torch.func`` transforms (and through our ops).

Our C++ backwards have no derivative of their own. Before the fix, a second derivative through
a fast model (a gradient penalty, GradNorm, a Hessian-vector product) silently missed their
terms (ESMM: wrong by 100%) or raised on an ``out=`` GEMM (MMOE, PLE). Under
``create_graph=True`` the ops now form their gradients with autograd over the same computation
in PyTorch ops, and the expert GEMMs without ``out=``.

A first call under ``torch.inference_mode()`` once cached an inference tensor (a gate's expert
index) that a later training call of PLE could not save for backward: that call raised.

Our ops and autograd Functions have no tangent formulas and no batching rules. Before the fix,
forward-mode AD through a fast model returned no tangent at all (or zeros under
``torch.func.jvp``), and ``torch.func.grad`` raised. The models now run nextrec's own math under
these transforms: tangents and gradients equal the per-module model's in float64. An op called
directly on an input that carries a tangent raises.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call

from model_pairs import FLAVOURS, KINDS, assert_same_results, forward_backward, model_pair, output_of, weighted_sum
from nextrec_generation import nextrec_float64

SEEDS = [random.randrange(2**31) for _ in range(2)]  # fresh configurations; the seed is in the test id


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _output(model, params: dict, x: dict) -> torch.Tensor:
    out = functional_call(model, params, (x,))
    return torch.cat(out, dim=1) if isinstance(out, (list, tuple)) else out


def _differentiated(model) -> list[str]:
    """An embedding table, the first weight of an expert (or ESMM tower), and the last tower
    weight: the batched paths, and a weight whose gradient is zero only if every row's last
    hidden layer is (the first expert's can be, with a few rows and dead ReLUs)."""
    names = [n for n, _ in model.named_parameters()]
    table = next(n for n in names if n.startswith("embedding.") and n.endswith(".weight"))
    weights = [n for n in names if ("expert" in n or "tower" in n) and n.endswith("weight")]
    return [table, weights[0], weights[-1]]


def _tangents(model, names: list[str], seed: int) -> dict:
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(params[n].shape, generator=gen, dtype=params[n].dtype) for n in names}


def _pair(flavour, kind, seed, mode):
    plain, fast, x = model_pair(flavour, kind, seed)
    for model in (plain, fast):
        model.train(mode == "train")
    return plain, fast, x


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seed", SEEDS)
def test_forward_mode_ad_tangents_equal_plain(flavour, kind, seed, mode):
    """``forward_ad.dual_level`` and ``torch.func.jvp``: the output tangent for tangents on a
    table and an expert (or tower) weight equals the per-module model's."""
    plain, fast, x = _pair(flavour, kind, seed, mode)
    names = _differentiated(plain)
    tangents = _tangents(plain, names, seed)
    results = {}
    for which, model in (("plain", plain), ("fast", fast)):
        params = {n: p.detach() for n, p in model.named_parameters() if n in names}
        with nextrec_float64():
            with fwad.dual_level():
                duals = {n: fwad.make_dual(params[n], tangents[n]) for n in names}
                try:
                    dual_out = fwad.unpack_dual(_output(model, duals, x))
                except NotImplementedError as error:  # PyTorch's own CPU attention has no forward AD
                    if which == "plain" and "forward AD" in str(error):
                        pytest.skip(f"this configuration has no forward-mode AD in PyTorch: {error} (seed {seed})")
                    raise
            # In train mode BatchNorm's running statistics move once per call in both models
            # alike; torch.func refuses that in-place update for any model (nn.BatchNorm1d's too).
            jvp_tangent = torch.func.jvp(lambda *ps: _output(model, dict(zip(names, ps)), x),
                                         tuple(params[n] for n in names),
                                         tuple(tangents[n] for n in names))[1] if mode == "eval" else None
        assert dual_out.tangent is not None, f"{which}: no tangent (seed {seed})"
        results[which] = (dual_out.primal.detach(), dual_out.tangent, jvp_tangent)
    for got, want, what in zip(results["fast"], results["plain"], ("output", "dual tangent", "jvp tangent")):
        if want is None:
            continue
        # Some configurations' tangents are NaN in nextrec's own math too (forward-mode AD of a
        # norm at zero): the fast model must give the same NaNs.
        if what != "output" and not (want != 0).any():  # dead ReLUs over a few rows: nothing to compare
            pytest.skip(f"the plain model's {what} is all zeros in this configuration (seed {seed})")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True,
                                   msg=lambda m: f"{what}: {m} (seed {seed})")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seed", SEEDS)
def test_torch_func_grad_equals_plain(flavour, kind, seed):
    """``torch.func.grad`` of a weighted output sum over a table and an expert weight equals the
    per-module model's gradient (eval mode: torch.func refuses BatchNorm's in-place statistics
    update in train mode, for nn.BatchNorm1d too)."""
    plain, fast, x = _pair(flavour, kind, seed, "eval")
    names = _differentiated(plain)
    grads = {}
    for which, model in (("plain", plain), ("fast", fast)):
        params = {n: p.detach() for n, p in model.named_parameters() if n in names}

        def loss(ps):
            return weighted_sum(_output(model, ps, x))

        with nextrec_float64():
            grads[which] = torch.func.grad(loss)(params)
    if not any(grads["plain"][name].abs().max() > 0 for name in names):  # dead ReLUs over a few rows
        pytest.skip(f"the plain model's gradients are all zero in this configuration (seed {seed})")
    for name in names:
        torch.testing.assert_close(grads["fast"][name], grads["plain"][name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}: {m} (seed {seed})")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seed", SEEDS)
def test_training_after_inference_mode_equals_plain(flavour, kind, seed):
    """Calls under ``torch.inference_mode()`` (eval, then train mode: BatchNorm statistics move
    in both models alike) give the plain model's outputs, and a training step after them gives
    its outputs and every gradient."""
    plain, fast, x = model_pair(flavour, kind, seed)
    for train in (False, True):
        for model in (plain, fast):
            model.train(train)
        with torch.inference_mode():
            outs = [output_of(model, x) for model in (fast, plain)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"inference_mode, train={train}: {m} (seed {seed})")
    assert_same_results(forward_backward(fast, x), forward_backward(plain, x))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seed", SEEDS + [random.randrange(2**31) for _ in range(2)])
def test_double_backward_equals_plain(flavour, kind, seed, mode):
    """A gradient penalty's gradient (``create_graph=True``, then backward through the
    gradients) equals the per-module model's for every parameter, tables included. Attention
    poolings run PyTorch's math attention (its CPU flash attention has no second derivative);
    skipped where the per-module model has none all the same (hardsigmoid's backward)."""
    plain, fast, x = _pair(flavour, kind, seed, mode)
    results = {}
    for which, model in (("plain", plain), ("fast", fast)):
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])  # frozen tables: none
        with nextrec_float64(), sdpa_kernel(SDPBackend.MATH):
            out = output_of(model, x)
            grads = torch.autograd.grad(weighted_sum(out), params, create_graph=True, allow_unused=True)
            penalty = sum(g.square().sum() for g in grads if g is not None)
            if which == "plain" and not penalty.requires_grad:
                pytest.skip(f"no gradient depends on a parameter in this configuration (seed {seed})")
            try:
                second = torch.autograd.grad(penalty, params, allow_unused=True)
            except RuntimeError as error:
                if which == "plain" and "is not implemented" in str(error):
                    pytest.skip(f"this configuration has no second derivative in PyTorch: {error} (seed {seed})")
                raise
        results[which] = (out.detach(), {n: None if g is None else g.detach() for n, g in zip(names, second)})
    (out_fast, g_fast), (out_plain, g_plain) = results["fast"], results["plain"]
    # 1e-8, not 1e-10 as elsewhere: a train-mode BatchNorm channel nearly constant over the few
    # rows amplifies summation-order rounding (seen: a spread of 1e-5 of the channel's size gave
    # 2.2e-10 at the output, with the torch backend, plain's order, 1e-14). A wrong second
    # derivative errs by its own size, which the gradients below are held to 1e-6 of.
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-8, atol=1e-12)
    # Linear biases before a training-mode BatchNorm have a zero gradient in exact arithmetic:
    # there both are rounding noise, which the absolute tolerance (relative to the largest) covers.
    finite = [g[g.isfinite()].abs().max().item() for g in g_plain.values() if g is not None and g.isfinite().any()]
    scale = max(finite, default=0.0)
    if scale == 0:  # dead ReLUs over a few rows
        pytest.skip(f"the plain model's second derivatives are all zero or NaN in this configuration (seed {seed})")
    for name, g in g_plain.items():
        if g is None:
            assert g_fast[name] is None or not g_fast[name].any(), name
            continue
        assert g_fast[name] is not None, f"{name}: no gradient"
        if name.startswith("embedding.") and g.isnan().any() and not torch.equal(g.isnan(), g_fast[name].isnan()):
            # nextrec's attention pooling has NaN second derivatives (a softmax over fully
            # masked positions); through zero-weighted padding positions they reach a table's
            # rows differently on the two paths. Elsewhere the same NaNs are required.
            continue
        torch.testing.assert_close(g_fast[name], g, rtol=1e-6, atol=1e-9 * scale, equal_nan=True,
                                   msg=lambda m: f"{name}: {m} (seed {seed})")


def _pooling_call(table):
    from nextrec_fast.ops import pooled_embedding as pe
    ids = [torch.tensor([[1, 2, 0], [3, 0, 0]])]
    return pe.pooled_embedding([table], ids, table_index=[0], combiners=["mean"], mask_ids=[0], max_lens=[-1],
                               feature_names=["f"])


def _batch_norm_call(x):
    from nextrec_fast.ops import batch_norm_act as op
    channels = x.shape[1]
    ones, zeros = torch.ones(channels, dtype=x.dtype), torch.zeros(channels, dtype=x.dtype)
    return op.batch_norm_act(x, experts=2, linear_bias=zeros, weight=ones, bias=zeros, running_mean=None,
                             running_var=None, training=True, eps=1e-5, relu=True, out_expert_major=False)[0]


@pytest.mark.parametrize("call, shape", [(_pooling_call, (5, 4)), (_batch_norm_call, (6, 4))],
                         ids=["pooled_embedding", "batch_norm_act"])
def test_ops_refuse_inputs_with_tangents(call, shape):
    """An op input carrying a tangent raises (naming the op), under ``dual_level`` and
    ``torch.func.jvp``; without a tangent the same call runs inside both."""
    from nextrec_fast.ops import batch_norm_act, pooled_embedding
    if not (pooled_embedding.is_available() and batch_norm_act.is_available()):
        pytest.skip(f"the C++ extension is unavailable: {pooled_embedding.unavailable_reason()}")
    x = torch.randn(*shape, dtype=torch.float64)
    with fwad.dual_level():
        plain = call(x)  # no tangent anywhere: runs
        with pytest.raises(NotImplementedError, match="nextrec_fast.*forward-mode AD"):
            call(fwad.make_dual(x, torch.ones_like(x)))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(call, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(call(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("layout", ["batch_major", "grouped_expert_major"])
@pytest.mark.parametrize("variant", ["relu", "identity", "no_affine", "no_linear_bias"])
def test_batch_norm_act_gradgradcheck(training, layout, variant):
    """The op's first derivative is differentiable (float64 ``gradgradcheck``): x, linear bias,
    weight and bias, both input layouts and both output layouts; with ReLU or the identity,
    without the affine parameters, without the linear bias."""
    from nextrec_fast.ops import batch_norm_act as op
    if not op.is_available():
        pytest.skip("the C++ extension is unavailable")
    gen = torch.Generator().manual_seed(11)
    experts, batch, width = 4, 6, 3
    x = torch.randn(batch, experts * width, generator=gen, dtype=torch.float64)
    if layout == "grouped_expert_major":  # [G, B, (E/G)*N], G = 2
        x = x.view(batch, 2, 2 * width).transpose(0, 1).contiguous()
    params = [torch.randn(experts * width, generator=gen, dtype=torch.float64) for _ in range(3)]
    running = (torch.randn(experts * width, generator=gen, dtype=torch.float64),
               torch.rand(experts * width, generator=gen, dtype=torch.float64) + 0.5)
    present = {"no_affine": [True, False, False], "no_linear_bias": [False, True, True]}.get(variant, [True] * 3)
    for out_expert_major in (False, True):
        def fn(x, *given):
            given = iter(given)
            lb, w, b = (next(given) if keep else None for keep in present)
            return op.batch_norm_act(x, experts=experts, linear_bias=lb, weight=w, bias=b, running_mean=running[0],
                                     running_var=running[1], training=training, eps=1e-3, relu=variant != "identity",
                                     out_expert_major=out_expert_major)[0]
        inputs = tuple(t.clone().requires_grad_() for t in (x, *(p for p, keep in zip(params, present) if keep)))
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_pooled_embedding_gradgradcheck():
    """The pooling op's first derivative is differentiable (float64 ``gradgradcheck``) in the
    tables and the per-id weights: padded and jagged bags, sum and mean, truncation, a shared
    table; a padding row gets no gradient in either order."""
    from nextrec_fast.ops import pooled_embedding as pe
    if not pe.is_available():
        pytest.skip(f"the C++ extension is unavailable: {pe.unavailable_reason()}")
    gen = torch.Generator().manual_seed(5)
    tables = [torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)]
    ids = [torch.tensor([[1, 0, 3], [0, 0, 0], [6, 6, 2]]), torch.tensor([4, 0, 1, 1, 3]), torch.tensor([[2], [5], [0]])]
    offsets = [None, torch.tensor([0, 2, 2, 5]), None]
    weights = [torch.rand(3, 3, generator=gen, dtype=torch.float64), torch.rand(5, generator=gen, dtype=torch.float64)]

    def fn(t0, t1, w0, w1):
        out = pe.pooled_embedding([t0, t1], ids, table_index=[0, 1, 0], combiners=["mean", "sum", "sum"],
                                  mask_ids=[0, 0, -1], max_lens=[2, -1, -1], feature_names=["a", "b", "c"],
                                  offsets=offsets, per_id_weights=[w0, w1, None], grad_padding_idx=[0, -1])
        return out * out  # not linear in the tables: their second derivative is not zero
    inputs = tuple(t.clone().requires_grad_() for t in (*tables, *weights))
    assert torch.autograd.gradgradcheck(fn, inputs)
    (grad_table,) = torch.autograd.grad(fn(*inputs).sum(), inputs[0], create_graph=True)
    assert grad_table.requires_grad and not grad_table[0].any()  # the padding row
    # A table no feature reads gets zeros, with create_graph as without.
    unread = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    out = pe.pooled_embedding([inputs[0], unread], ids[:1], table_index=[0], combiners=["sum"], mask_ids=[0],
                              max_lens=[-1], feature_names=["a"])
    for create_graph in (False, True):
        (grad_unread,) = torch.autograd.grad(out.square().sum(), unread, retain_graph=True, create_graph=create_graph)
        assert grad_unread.shape == unread.shape and not grad_unread.any()
