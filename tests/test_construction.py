"""Construction in a device or dtype context puts parameters and buffers where nextrec's go.

``with torch.device("meta")`` then ``to_empty`` + ``load_state_dict`` (deferred initialisation),
``torch.set_default_dtype``, and ``with torch.device("cuda")`` where CUDA exists: the fast model
of each flavour (``model_pairs``) beside the per-module one built the same way.
"""
from __future__ import annotations

import random

import pytest
import torch

import nextrec_fast
from model_pairs import FLAVOURS, KINDS, constructors, output_of

SEED = random.randrange(2**31)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _placement(model) -> dict:
    return {name: (t.device.type, t.dtype) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_meta_device_then_to_empty_and_load(flavour, kind):
    plain_ctor, fast_ctor, inputs = constructors(flavour, kind, SEED)
    with torch.device("meta"):
        plain_meta, fast = plain_ctor(), fast_ctor()
    assert _placement(fast) == _placement(plain_meta)
    assert all(t.device.type == "meta" for t in fast.state_dict().values())
    plain = plain_ctor()  # real weights, built normally
    fast.to_empty(device="cpu")
    fast.load_state_dict(plain.state_dict(), strict=True)
    assert _placement(fast) == _placement(plain)
    if nextrec_fast.is_accelerated(fast) or flavour == "standalone":
        plain.eval()
        fast.eval()
        x = inputs(plain)
        with torch.no_grad():
            torch.testing.assert_close(output_of(fast, x).float(), output_of(plain, x).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_default_dtype(flavour, kind):
    plain_ctor, fast_ctor, _ = constructors(flavour, kind, SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        plain, fast = plain_ctor(), fast_ctor()
    finally:
        torch.set_default_dtype(previous)
    assert _placement(fast) == _placement(plain)
    assert any(dtype == torch.float64 for _, dtype in _placement(fast).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cuda_device_context(flavour, kind):
    plain_ctor, fast_ctor, _ = constructors(flavour, kind, SEED)
    with torch.device("cuda"):
        plain, fast = plain_ctor(), fast_ctor()
    assert _placement(fast) == _placement(plain)
