"""The regularisation gradient of an accelerated model reaches every autograd consumer.

``accelerate(fast_regularization=True)`` replaces nextrec's ``add_reg_loss`` graph with one node
(``nextrec_fast.integration.regularization``). Its gradient must be what plain nextrec gives to
``torch.autograd.grad``, ``backward(inputs=...)`` and GradScaler; DDP is in tests/test_ddp.py.
"""
from __future__ import annotations

import random

import pytest
import torch

from model_pairs import KINDS, assert_same_results, model_pair, output_of, set_regularization

SEED = random.randrange(2**31)
pytestmark = pytest.mark.nextrec


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _pair(kind):
    plain, fast, x = model_pair("accelerated", kind, SEED)
    for model in (plain, fast):
        set_regularization(model)
    assert fast._nextrec_fast_options["fast_regularization"]
    return plain, fast, x


def _loss(model, x):
    out = output_of(model, x)
    reg = model.add_reg_loss()
    assert reg.item() > 0
    return (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum() + reg, reg


def _assert_same(fast_result, plain_result) -> None:
    """Every gradient at float64 precision (a parameter summed wrongly shows there). The loss at
    float32's, relative to the regularisation: nextrec sums it (~1e5-1e6 non-negative terms) into
    a float32 scalar, as we do in another order, and blocked float32 sums of n terms in different
    orders drift apart by about eps * sqrt(n / lanes) relative (a random walk over the partial
    sums; 1e-5 is ~80 eps). A bound relative to the whole loss, whose other terms can cancel it to
    near 0, failed on correct sums (4.6e-6 of a loss of -0.026)."""
    fast_loss, fast_grads, reg = fast_result
    torch.testing.assert_close(fast_loss, plain_result[0], rtol=0, atol=1e-5 * abs(reg.item()))
    assert_same_results((torch.zeros(()), fast_grads), (torch.zeros(()), plain_result[1]))


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen tables (0.6) left out


def _compare(kind, backward) -> None:
    """The loss and gradients of the fast and the plain model; ``backward(model, loss)`` returns
    the {name: gradient} it produced."""
    plain, fast, x = _pair(kind)
    results = []
    for model in (fast, plain):
        model.zero_grad(set_to_none=True)
        loss, reg = _loss(model, x)
        results.append((loss.detach(), backward(model, loss), reg.detach()))
    _assert_same(*results)


def _grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_autograd_grad(kind):
    def backward(model, loss):
        names, params = zip(*_trainable(model))
        return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    _compare(kind, backward)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_with_inputs(kind):
    """``backward(inputs=...)``: only the listed parameters get a gradient, the regularisation's included."""
    def backward(model, loss):
        params = [p for _, p in _trainable(model)]
        loss.backward(inputs=params[::2])
        assert all(p.grad is None for p in params[1::2])
        return _grads(model)
    _compare(kind, backward)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler(kind):
    """AMP's GradScaler scales the loss: the regularisation gradient is scaled too, and unscaled."""
    def backward(model, loss):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        return _grads(model)
    _compare(kind, backward)
