"""Joined weights kept between inference calls (``nextrec_fast.layers.joined_weights``): reused
only while every source is the same tensor, unwritten; never under grad; and a model's eval
outputs follow every way its weights change."""
from __future__ import annotations

import copy

import pytest
import torch

from nextrec_fast.layers import joined_weights


def _sources():
    return [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]


@pytest.mark.parametrize("how", ["cat", "stack"])
def test_reused_only_while_the_sources_are_unchanged(how):
    join, ref = getattr(joined_weights, how), getattr(torch, how)
    ws = _sources()
    with torch.no_grad():
        first = join(ws, 0)
        assert torch.equal(first, ref(ws, 0))
        assert join(ws, 0) is first  # reused
        assert join(ws, 1) is not first and torch.equal(join(ws, 1), ref(ws, 1))  # another dim, another entry
        ws[1].add_(1.0)  # an in-place write (optimiser step, load_state_dict, copy_) bumps the version
        second = join(ws, 0)
        assert second is not first and torch.equal(second, ref(ws, 0))
        ws[2] = torch.nn.Parameter(ws[2].detach().clone())  # a new tensor in the same place
        third = join(ws, 0)
        assert third is not second and torch.equal(third, ref(ws, 0))
        with torch.inference_mode():
            assert torch.equal(join(ws, 0), ref(ws, 0))
        ws[0].data = torch.zeros(3, 4)  # new storage behind the same Parameter
        assert torch.equal(join(ws, 0), ref(ws, 0))
    # With grad: a plain join every time, part of the graph.
    out = join(ws, 0)
    assert out.grad_fn is not None and join(ws, 0) is not out
    out.sum().backward()
    assert all(torch.equal(w.grad, torch.ones_like(w)) for w in ws)


def test_eval_outputs_follow_the_weights():
    """An eval model's outputs after its weights change in place, are loaded, or are replaced,
    equal a fresh copy's with those weights (a stale join would give the old outputs)."""
    import nextrec_fast
    from model_pairs import model_pair
    try:
        plain, fast, x = model_pair("accelerated", "ple", 7)
    except pytest.skip.Exception:
        plain, fast, x = model_pair("standalone", "ple", 7)
    fast.eval()

    def check():
        reference = copy.deepcopy(fast)  # no cache entry for the copy's weights yet
        with torch.no_grad():
            got, expected = fast(x), reference(x)
        got = torch.cat(got, 1) if isinstance(got, (list, tuple)) else got
        expected = torch.cat(expected, 1) if isinstance(expected, (list, tuple)) else expected
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        return got

    before = check()
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(1.1)
    assert not torch.equal(check(), before)
    state = {k: v * 0.9 if v.is_floating_point() else v for k, v in fast.state_dict().items()}
    fast.load_state_dict(state)
    check()
    expert_linear = next(m for n, m in fast.named_modules() if isinstance(m, torch.nn.Linear) and "expert" in n)
    expert_linear.weight = torch.nn.Parameter(torch.randn_like(expert_linear.weight))
    check()
    assert nextrec_fast.is_accelerated(fast) or type(fast).__module__.startswith("nextrec_fast")
