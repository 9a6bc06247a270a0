"""Small batches without autograd run the model's own module-by-module forward, with our embedding
layer pooling (``_FastForward.module_wise_max_batch``): nextrec's code for the experts, gates and
towers, so its results and hooks are nextrec's; the batched plan for larger batches, with
autograd, and when the setting is 0.

Every other test module runs with the setting at 0 (tests/conftest.py), so that their small
batches check the batched plan itself; these tests are marked ``module_wise`` and keep it.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

import nextrec_fast
from nextrec_fast import _extension
from model_pairs import FLAVOURS, KINDS, count_batched_banks, model_pair, nextrec_model, output_of
from nextrec_generation import GENERATION

pytestmark = pytest.mark.module_wise

SEEDS = [random.randrange(2**31) for _ in range(2)]  # fresh configurations; the seed is in the test id


def _rows(x: dict) -> int:
    return next(v.shape[0] for v in x.values() if isinstance(v, torch.Tensor) and v.dim() >= 1)


def _run(model, x, grad: bool = False, inference: bool = False):
    """(output, batched bank runs, profiler event names) of one forward."""
    context = torch.inference_mode() if inference else torch.enable_grad() if grad else torch.no_grad()
    with context, count_batched_banks() as counts, torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = output_of(model, x)
    return out, counts["banks"], {e.name for e in prof.events()}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_small_batch_without_autograd_runs_module_wise(flavour, kind, seed):
    plain, fast, x = model_pair(flavour, kind, seed)  # float64, the same weights
    plain.eval()
    fast.eval()
    assert _rows(x) <= fast.module_wise_max_batch
    for inference in (False, True):
        out, banks, events = _run(fast, x, inference=inference)
        assert banks == 0, "the batched plan ran"
        assert "nextrec_fast.module_wise" in events
        if _extension.is_available():
            assert "nextrec_fast::pooled_embedding_forward" in events, "the embeddings were not pooled by the op"
        with torch.no_grad():
            expected = output_of(plain, x)
        # float64 on both sides: the same computation up to the pooling's summation order
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS[:1])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_batched_plan_above_the_limit_with_autograd_or_when_turned_off(flavour, kind, seed):
    plain, fast, x = model_pair(flavour, kind, seed)
    plain.eval()
    fast.eval()
    rows = _rows(x)
    with torch.no_grad():
        expected = output_of(plain, x)
    cases = {"above the limit": (rows - 1, False), "autograd": (rows, True), "turned off": (0, False)}
    for case, (limit, grad) in cases.items():
        fast.module_wise_max_batch = limit  # per instance, as users set it
        out, banks, events = _run(fast, x, grad=grad)
        assert banks > 0 and "nextrec_fast.module_wise" not in events, f"{case}: the batched plan did not run"
        torch.testing.assert_close(out.detach(), expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{case}: {m}")
    del fast.module_wise_max_batch
    assert _run(fast, x)[1] == 0, "deleting the instance setting brings back the default"


@pytest.mark.parametrize("seed", SEEDS[:1])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_module_wise_matches_the_batched_plan_in_train_mode_and_with_16_bit_tables(flavour, kind, seed):
    """Train-mode BatchNorm under no_grad (running statistics move), 16-bit tables, a forward hook:
    the module-wise path against the batched plan on a copy of the same model."""
    _, fast, x = model_pair(flavour, kind, seed)  # float64, train mode
    for module in fast.modules():  # dropout draws differ between the paths; BatchNorm stays in train mode
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    batched = copy.deepcopy(fast)
    batched.module_wise_max_batch = 0
    out, banks, _ = _run(fast, x)
    expected, batched_banks, _ = _run(batched, x)
    assert banks == 0 < batched_banks
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for name, buffer in batched.named_buffers():  # running statistics, batch counts
        torch.testing.assert_close(dict(fast.named_buffers())[name], buffer, rtol=1e-10, atol=1e-12, msg=name)

    fast, batched = fast.float().eval(), batched.float().eval()
    x = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
    if not any(s.pooling_module is not None for s in fast.embedding.slots):  # attention poolings refuse 16 bits
        for model in (fast, batched):
            model.embedding.cast_tables(torch.bfloat16)
        out, expected = _run(fast, x)[0], _run(batched, x)[0]
        assert out.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # float32 rounding apart

    calls = []
    fast.embedding.register_forward_hook(lambda *args: calls.append("embedding"))
    _run(fast, x)
    assert calls == ["embedding"]


@pytest.mark.nextrec
@pytest.mark.parametrize("kind", KINDS)
def test_nextrec_predict_at_small_batches(kind):
    """nextrec's own predict, batch_size 4: the accelerated model predicts what the plain one does;
    where nextrec runs predict without autograd (0.3) it takes the module-wise path. nextrec
    0.6.14's predict leaves autograd on (docs/models.md), so there the batched plan runs."""
    plain, x = nextrec_model(kind, SEEDS[0])
    fast = nextrec_fast.accelerate(copy.deepcopy(plain))
    plain.eval()
    fast.eval()
    data = {k: v.numpy() for k, v in x.items()}
    kwargs = {"return_dataframe": False} if GENERATION == "0.6" else {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = np.asarray(fast.predict(data, batch_size=4, **kwargs), dtype=float)
    expected = np.asarray(plain.predict(data, batch_size=4, **kwargs), dtype=float)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if GENERATION == "0.3":
        assert "nextrec_fast.module_wise" in {e.name for e in prof.events()}
