"""Every way users copy a model gives one that computes the same and is still fast.

``copy.deepcopy``, ``copy.copy``, ``torch.optim.swa_utils.AveragedModel`` (SWA and EMA), a
hand-written EMA helper (deepcopy + lerp of the state, as timm's ModelEmaV2), and
``torch.save(model)`` / ``torch.load`` in this and in a fresh process. An accelerated nextrec
model's copy is nextrec's class accelerated again with the same switches (docs/modules.md, "Copies").
"""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import nextrec_fast
from nextrec_fast.models.forwards import _FastForward
from model_pairs import FLAVOURS, KINDS, assert_same_results, count_batched_banks, forward_backward, model_pair

SEED = random.randrange(2**31)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _assert_still_fast(original, clone) -> None:
    assert type(clone) is type(original) and type(clone.embedding) is type(original.embedding)
    if nextrec_fast.is_accelerated(original):
        assert nextrec_fast.is_accelerated(clone)
        assert clone._nextrec_fast_options == original._nextrec_fast_options


def _torch_save_load(model, tmp_path):
    torch.save(model, str(tmp_path / "model.pt"))
    return torch.load(str(tmp_path / "model.pt"), weights_only=False)  # a whole model is a pickle


PROTOCOLS = {
    "deepcopy": lambda m, tmp_path: copy.deepcopy(m),
    "copy": lambda m, tmp_path: copy.copy(m),
    "torch.save/load": _torch_save_load,
}


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_copy_computes_the_same_and_stays_fast(flavour, kind, protocol, tmp_path):
    plain, fast, x = model_pair(flavour, kind, SEED)
    clone = PROTOCOLS[protocol](fast, tmp_path)
    _assert_still_fast(fast, clone)
    shared = {id(p) for p in fast.parameters()} & {id(p) for p in clone.parameters()}
    # A shallow copy shares parameters (as for any nn.Module); the others own theirs.
    assert (len(shared) == len(list(fast.parameters()))) if protocol == "copy" else not shared
    expected = forward_backward(plain, x)
    with count_batched_banks() as banks:
        result = forward_backward(clone, x)
    assert banks["banks"] > 0, "the copy ran no batched expert bank"
    assert_same_results(result, expected)
    assert_same_results(forward_backward(fast, x), expected)  # the original is untouched


def _sgd_step(model, lr: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


@pytest.mark.parametrize("averaging", ["swa", "ema", "ema-helper"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_averaged_copies(flavour, kind, averaging):
    """Averaged weights over two steps: the averaged fast model computes as nextrec's averaged model."""
    plain, fast, x = model_pair(flavour, kind, SEED)
    models = {"plain": plain, "fast": fast}
    averaged = {}
    for label, model in models.items():
        if averaging == "swa":
            averaged[label] = AveragedModel(model)
        elif averaging == "ema":
            averaged[label] = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        else:
            averaged[label] = copy.deepcopy(model).requires_grad_(False)
    for _ in range(2):
        for model in models.values():
            forward_backward(model, x)
            _sgd_step(model)
        # Train-mode BatchNorm over 2-9 rows can amplify one step's float64 rounding (two valid
        # summation orders) into the next step's results beyond the bounds at the end (seed
        # 149171305: 1.8e-6 on a table gradient in a full run). So the fast model's step is
        # checked loosely here (a wrong gradient or a skipped update is far outside), and then it
        # takes nextrec's updated parameters and buffers in place: both averages see the same
        # weights from here on.
        expected = plain.state_dict()
        for name, value in fast.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        fast.load_state_dict(expected)
        for label, model in models.items():
            avg = averaged[label]
            if averaging == "ema-helper":
                with torch.no_grad():
                    for a, m in zip(avg.state_dict().values(), model.state_dict().values()):
                        a.lerp_(m, 0.1) if a.is_floating_point() else a.copy_(m)
            else:
                avg.update_parameters(model)
    inner = averaged["fast"].module if averaging != "ema-helper" else averaged["fast"]
    _assert_still_fast(fast, inner)
    for avg in averaged.values():
        avg.requires_grad_(True)
    # Both averages took the same weights and buffers in the same order: the same bits.
    expected = averaged["plain"].state_dict()
    for name, value in averaged["fast"].state_dict().items():
        assert torch.equal(value, expected[name]), name
    # What the averaged fast copy computes from them: train mode (batch statistics; BatchNorm over
    # 2-9 rows amplifies float64 rounding: a PLE gate-weight gradient differed by 5.9e-9 at a
    # gradient scale of 1.8, 1980399234), then eval mode (the averaged running statistics). A
    # stale weight or buffer in the copy's fast path would differ by orders more than these bounds.
    for training in (True, False):
        for avg in averaged.values():
            avg.train(training)
        assert_same_results(forward_backward(averaged["fast"], x), forward_backward(averaged["plain"], x),
                            rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_torch_load_in_fresh_process(flavour, tmp_path):
    """A whole-model pickle loads where only nextrec_fast (and nextrec) are imported by it."""
    plain, fast, x = model_pair(flavour, "mmoe", SEED)
    fast.eval()
    with torch.no_grad():
        expected = fast(x)
    torch.save((fast, x, expected), str(tmp_path / "model.pt"))
    # The parent's thread count: a float64 result is bit-exact only for the same GEMM split.
    # And the parent's small-batch setting (tests/conftest.py): the same forward path on both sides.
    code = (f"import torch, nextrec_fast\ntorch.set_num_threads({torch.get_num_threads()})\n"
            "from nextrec_fast.models.forwards import _FastForward\n"
            f"_FastForward.module_wise_max_batch = {_FastForward.module_wise_max_batch}\n"
            f"model, x, expected = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            "assert type(model).__name__ == 'MMOE'\n"
            f"assert nextrec_fast.is_accelerated(model) == {nextrec_fast.is_accelerated(fast)}\n"
            "with torch.no_grad():\n"
            "    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path), env={**os.environ, "NEXTREC_FAST_NO_JIT": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.nextrec
@pytest.mark.parametrize("kind", KINDS)
def test_restored_model_pickles_as_nextrec(kind, tmp_path):
    """``restore`` first for a pickle that loads with nextrec alone (docs/modules.md, "Copies")."""
    _, fast, x = model_pair("accelerated", kind, SEED)
    original = type(fast)._nextrec_fast_original
    nextrec_fast.restore(fast)
    clone = _torch_save_load(fast, tmp_path)
    assert type(clone) is original and not nextrec_fast.is_accelerated(clone)


@pytest.mark.nextrec
def test_restored_drop_in_pickles_as_nextrec(tmp_path):
    """A drop-in (``from nextrec_fast import MMOE`` with nextrec installed) after ``restore`` is
    nextrec's own class, so its pickle names nothing of nextrec_fast."""
    from model_pairs import nextrec_model
    from nextrec_fast.models import default_drop_ins
    drop_in_class = default_drop_ins().MMOE
    model, x = nextrec_model("mmoe", SEED, cls=drop_in_class)
    assert nextrec_fast.is_accelerated(model) and isinstance(model, drop_in_class)
    nextrec_fast.restore(model)
    assert type(model) is drop_in_class._nextrec_fast_drop_in_base
    torch.save(model, str(tmp_path / "model.pt"))
    assert b"nextrec_fast" not in (tmp_path / "model.pt").read_bytes()
