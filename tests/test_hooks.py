"""Hooks and reparametrised weights on submodules the batched path reads without calling.

nextrec calls every expert, gate, tower and embedding table; our fast forward batches them. A
hook or a parametrised / pruned weight on one of them must give what nextrec gives: the same
hook calls, outputs and gradients. The part with the hook runs nextrec's per-module forward;
the others stay batched (checked by counting batched expert banks).
"""
from __future__ import annotations

import collections
import random

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize, prune

from model_pairs import (FLAVOURS, KINDS, assert_same_results, count_batched_banks, example_parts, forward_backward,
                         model_pair)

SEEDS = [random.randrange(2**31) for _ in range(2)]  # fresh configurations; the seed is in the test id


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _callable_modules(model) -> dict[str, nn.Module]:
    """Every submodule except containers (ModuleList / ModuleDict are iterated, never called)."""
    return {name: m for name, m in model.named_modules()
            if name and not isinstance(m, (nn.ModuleList, nn.ModuleDict))}


def _register(model, names, kind: str, calls: collections.Counter) -> list:
    handles = []
    for name in names:
        module = model.get_submodule(name)
        if kind == "forward":
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: calls.update([name])))
        elif kind == "forward_pre":
            handles.append(module.register_forward_pre_hook(lambda m, i, name=name: calls.update([name])))
        elif kind == "full_backward":
            handles.append(module.register_full_backward_hook(lambda m, gi, go, name=name: calls.update([name])))
        elif kind == "backward_pre":
            handles.append(module.register_full_backward_pre_hook(lambda m, go, name=name: calls.update([name])))
    return handles


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward", "backward_pre"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hooks_on_example_parts_fire_as_in_nextrec(flavour, kind, hook):
    """The usual way to log gate weights or expert usage: a hook on a gate, an expert, a tower
    and an embedding table. Each fires as often as in nextrec; the rest stays batched."""
    plain, fast, x = model_pair(flavour, kind, SEEDS[0])
    names = example_parts(plain, kind)
    plain_calls, fast_calls = collections.Counter(), collections.Counter()
    _register(plain, names, hook, plain_calls)
    _register(fast, names, hook, fast_calls)
    expected = forward_backward(plain, x)
    with count_batched_banks() as banks:
        result = forward_backward(fast, x)
    assert plain_calls and fast_calls == plain_calls
    assert_same_results(result, expected)
    if _has_unhooked_mlp(plain, kind, names):  # a 1-expert, 1-task MMOE has nothing left to batch
        assert banks["banks"] > 0, "every part fell back to the per-module forward"


def _has_unhooked_mlp(model, kind: str, hooked: list[str]) -> bool:
    if kind != "mmoe":
        return True  # ESMM keeps its cvr tower, PLE its other experts and towers
    mlps = [f"experts.{i}" for i in range(len(model.experts))] + [f"towers.{i}" for i in range(len(model.towers))]
    return any(name not in hooked for name in mlps)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_forward_hook_on_every_module(flavour, kind):
    """A hook on every module nextrec calls: the same modules fire the same number of times."""
    plain, fast, x = model_pair(flavour, kind, SEEDS[1])
    plain_calls, fast_calls = collections.Counter(), collections.Counter()
    _register(plain, list(_callable_modules(plain)), "forward", plain_calls)
    _register(fast, list(_callable_modules(fast)), "forward", fast_calls)
    expected = forward_backward(plain, x)
    result = forward_backward(fast, x)
    assert fast_calls == plain_calls
    assert_same_results(result, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hook_that_changes_outputs(flavour, kind):
    """A forward hook returning a new output (e.g. masking an expert) changes ours as nextrec's."""
    plain, fast, x = model_pair(flavour, kind, SEEDS[0])
    name = example_parts(plain, kind)[1]
    for model in (plain, fast):
        model.get_submodule(name).register_forward_hook(lambda m, i, o: o * 0.5 + 0.25)
    assert_same_results(forward_backward(fast, x), forward_backward(plain, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_global_module_hooks(flavour, kind):
    """``register_module_forward_hook`` / ``..._pre_hook`` / ``register_module_full_backward_hook``
    fire for every module call: ours runs nextrec's per-module forward while one is registered."""
    plain, fast, x = model_pair(flavour, kind, SEEDS[1])
    results = {}
    for label, model in (("plain", plain), ("fast", fast)):
        names = {id(m): n for n, m in model.named_modules()}
        calls = collections.Counter()
        handles = [
            nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.update([("fwd", names.get(id(m)))])),
            nn.modules.module.register_module_forward_pre_hook(lambda m, i: calls.update([("pre", names.get(id(m)))])),
            nn.modules.module.register_module_full_backward_hook(
                lambda m, gi, go: calls.update([("bwd", names.get(id(m)))])),
        ]
        try:
            results[label] = forward_backward(model, x), calls
        finally:
            for h in handles:
                h.remove()
    assert results["fast"][1] == results["plain"][1]
    assert_same_results(results["fast"][0], results["plain"][0])


def _first_linear(module: nn.Module) -> nn.Module:
    return next(m for m in module.modules() if isinstance(m, (nn.Linear, nn.Embedding)))


REPARAMETRISATIONS = {
    "parametrizations.weight_norm": lambda m: parametrizations.weight_norm(m),
    "parametrizations.spectral_norm": lambda m: parametrizations.spectral_norm(m),
    "parametrizations.orthogonal": lambda m: parametrizations.orthogonal(m),
    "parametrize.register_parametrization": lambda m: parametrize.register_parametrization(m, "weight", _Scale()),
    "old-style weight_norm": lambda m: torch.nn.utils.weight_norm(m),
    "prune.l1_unstructured": lambda m: prune.l1_unstructured(m, "weight", amount=0.4),
}


class _Scale(nn.Module):
    def forward(self, weight):
        return weight * 0.5


@pytest.mark.parametrize("how", list(REPARAMETRISATIONS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reparametrised_weights_are_used(flavour, kind, how):
    """Every way of making a weight a function of other tensors, on the first Linear (or table) of
    each example part: the same outputs and gradients (of the underlying tensors) as nextrec, in
    two consecutive steps, the second from nextrec's updated parameters (a pruned or normalised
    weight computed once and then kept would be stale in the second)."""
    plain, fast, x = model_pair(flavour, kind, SEEDS[0])
    for model in (plain, fast):
        torch.manual_seed(0)
        for name in example_parts(model, kind):
            module = _first_linear(model.get_submodule(name))
            if how == "parametrizations.orthogonal" and isinstance(module, nn.Embedding):
                continue  # orthogonal tables are not a thing
            REPARAMETRISATIONS[how](module)
    fast.load_state_dict(plain.state_dict())  # the same spectral-norm vectors, masks, ...
    fast_params = dict(fast.named_parameters())
    for step in range(2):
        expected, result = forward_backward(plain, x), forward_backward(fast, x)
        assert_same_results(result, expected)
        with torch.no_grad():
            for name, p_plain in plain.named_parameters():
                if p_plain.grad is not None:
                    p_plain.sub_(0.1 * p_plain.grad)
                    # Train-mode BatchNorm over a few rows can amplify step 0's float64 rounding
                    # (two valid summation orders) into step 1's gradients beyond the 1e-9 bound.
                    # Step 1 starts from nextrec's updated parameters, copied in place, so it
                    # judges what step 1 computes; a weight cached at step 0 would be stale.
                    fast_params[name].copy_(p_plain)


def test_no_hooks_means_no_module_calls():
    """The check costs nothing when nothing is registered: default models stay fully batched."""
    from nextrec_fast.layers.hooks import global_module_hooks_active, needs_module_call
    _, fast, _ = model_pair("standalone", "ple", SEEDS[0])
    assert not global_module_hooks_active()
    assert not needs_module_call(fast.modules())


@pytest.mark.parametrize("hook", ["forward", "forward_pre"])  # (a level takes and returns lists: no
@pytest.mark.parametrize("flavour", FLAVOURS)                    # full backward hook fires in nextrec)
def test_hook_on_a_ple_level(flavour, hook):
    """nextrec calls each CGC level as a module: a hook on the level itself runs that level's own
    forward (its experts and gates with it); the other levels and the towers stay batched."""
    plain, fast, x = model_pair(flavour, "ple", SEEDS[1])
    names = [f"cgc_layers.{len(plain.cgc_layers) - 1}"]
    plain_calls, fast_calls = collections.Counter(), collections.Counter()
    _register(plain, names, hook, plain_calls)
    _register(fast, names, hook, fast_calls)
    expected = forward_backward(plain, x)
    result = forward_backward(fast, x)
    assert plain_calls and fast_calls == plain_calls
    assert_same_results(result, expected)
