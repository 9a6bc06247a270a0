"""The fast path is no further from float64 than nextrec's own float32, in every activation and
layout (#13's precision case: an ESMM tower whose BatchNorm has a channel of tiny batch variance).

Per configuration (``DRAWS`` random draws pooled), the median relative error over every output
and gradient element that is not exactly zero in float64 must be at most ``FACTOR`` times
nextrec's: a robust statistic over thousands of elements, where a loss of precision in one step
shows as a multiple. Measured over 12 pooled groups of 4 draws per activation: ours/nextrec is
0.5-0.8 at the median, at most 1.4 except softshrink (2.4: its cancellation at |x| = 0.5 turns
either side's rounding into a large relative error, so the ratio of two such errors has a wide
tail).

Why 12 draws: an activation with a kink (hardsigmoid's at +-3) lets float32 rounding put one
unit of the tiny-variance channel on the other side in one run and not in the other, which moves
every gradient upstream of it; which side flips is chance, so single draws have a heavy tail both
ways. hardsigmoid, 480 draws: the per-draw ratio was above 2 in 4.7% of draws (max 5.9) and
below 0.5 in 33%; pooled over 4 draws 1 of 120 groups failed (3.15x: CI dry run 11, seed
1221662557), over 8 draws the largest of 60 groups was 1.85x, over 12 draws 1.16x (40 groups).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

import nextrec_fast
from model_factory import random_inputs
from nextrec_fast import features as our_features
from nextrec_fast import reference
from nextrec_fast.activations import ACTIVATION_NAMES
from nextrec_fast.models import standalone
from model_pairs import FLAVOURS
from nextrec_generation import GENERATION

FACTOR = 2.0
FACTOR_FOR = {"softshrink": 3.5}
DRAWS = 12
SEED = random.randrange(2**31)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _features(module):
    """The issue's features: 5 sparse (one sharing a table), sequences mean/11, sum/5, mean/11, one dense."""
    sparse = [module.SparseFeature(f"s{i}", vocab_size=20 + i, embedding_dim=4) for i in range(4)]
    sparse.append(module.SparseFeature("s4", vocab_size=20, embedding_dim=4, embedding_name="s0"))
    sequence = [module.SequenceFeature(f"q{i}", vocab_size=30, max_len=n, embedding_dim=4, combiner=c, padding_idx=0)
                for i, (c, n) in enumerate([("mean", 11), ("sum", 5), ("mean", 11)])]
    return [module.DenseFeature("d0")], sparse, sequence


def _models(flavour: str, activation: str, seed: int):
    """(nextrec float32, fast float32, nextrec float64, x) for the issue's ESMM with ``activation``
    in the ctr tower; one first-layer channel of each tower scaled to a tiny batch variance."""
    kwargs = dict(ctr_params={"dims": [8, 3, 3], "activation": activation},
                  cvr_params={"dims": [3, 3], "activation": "silu"})
    if flavour == "standalone":
        feats = _features(our_features)
        torch.manual_seed(seed)
        plain = reference.ESMM(*feats, **kwargs)
        fast = standalone.ESMM(*feats, **kwargs)
        fast.load_state_dict(plain.state_dict())
    else:
        if GENERATION != "0.3":
            pytest.skip("the precision case is nextrec 0.3.1's ESMM API (0.6: tests/test_nextrec_v06.py)")
        from nextrec.basic import features as nr_features
        from nextrec.models.multi_task.esmm import ESMM
        feats = _features(nr_features)
        torch.manual_seed(seed)
        plain = ESMM(*feats, **kwargs)
        fast = None
    with torch.no_grad():
        for tower in (plain.ctr_tower, plain.cvr_tower):
            tower.mlp[0].weight[0] *= 0.005
    if fast is None:
        fast = nextrec_fast.accelerate(copy.deepcopy(plain))
    else:
        fast.load_state_dict(plain.state_dict())
    x = random_inputs(*feats, batch=40, generator=torch.Generator().manual_seed(seed))
    return plain, fast, copy.deepcopy(plain).double(), x


def _results(model, x) -> torch.Tensor:
    """Output and every gradient of one backward of a weighted sum, flattened, in float64."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    parts = [out.detach().reshape(-1)] + [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return torch.cat([t.double() for t in parts])


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_as_close_to_float64_as_nextrec(flavour, activation, backend):
    from nextrec_generation import nextrec_float64
    errors = {"ours": [], "nextrec": []}
    for draw in range(DRAWS):
        seed = (SEED + 31 * ACTIVATION_NAMES.index(activation) + draw) % 2**31
        print(f"seed={seed}")
        plain, fast, truth_model, x = _models(flavour, activation, seed)
        with nextrec_float64():
            truth = _results(truth_model, {k: v.double() if v.is_floating_point() else v for k, v in x.items()})
        nextrec = _results(plain, x)
        with nextrec_fast.use_backend(backend):
            ours = _results(fast, x)
        keep = truth != 0  # exact zeros (dead units, shrink zones) say nothing about rounding
        for name, result in (("ours", ours), ("nextrec", nextrec)):
            errors[name].append(((result - truth)[keep] / truth[keep]).abs())
    err_ours, err_nextrec = (torch.cat(errors[name]).median().item() for name in ("ours", "nextrec"))
    print(f"median relative error: ours {err_ours:.2e}, nextrec {err_nextrec:.2e}")
    factor = FACTOR_FOR.get(activation, FACTOR)
    assert err_ours <= factor * err_nextrec, f"ours {err_ours:.2e} vs nextrec {err_nextrec:.2e} (allowed {factor}x)"
