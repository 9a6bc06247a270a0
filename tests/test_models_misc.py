"""Dropout, state_dict round trips, checkpoints and the backend switch of the fast models."""
from __future__ import annotations

import random

import pytest
import torch

import nextrec_fast
from nextrec_fast import reference
from model_factory import random_features, random_inputs, random_model_kwargs
from test_model_parity import MODELS, build_pair


def _dropout_pair(model, p=0.3, seed=0):
    rng = random.Random(seed)
    dense, sparse, sequence = random_features(rng)
    kwargs = random_model_kwargs(model, rng)
    for key in ("expert_params", "shared_expert_params", "specific_expert_params", "ctr_params", "cvr_params"):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = {**kwargs[key], "dropout": p, "activation": "relu"}
    if isinstance(kwargs.get("specific_expert_params"), list):
        kwargs["specific_expert_params"] = [{**d, "dropout": p} for d in kwargs["specific_expert_params"]]
    ref_cls, fast_cls = MODELS[model]
    ref = ref_cls(dense, sparse, sequence, **kwargs)
    fast = fast_cls(dense, sparse, sequence, **kwargs)
    fast.load_state_dict(ref.state_dict())
    x = random_inputs(dense, sparse, sequence, batch=64, generator=torch.Generator().manual_seed(seed))
    return ref, fast, x


@pytest.mark.parametrize("model", list(MODELS))
def test_dropout_same_distribution(model):
    ref, fast, x = _dropout_pair(model, seed=random.randrange(2**31))
    ref.train()
    fast.train()
    with torch.no_grad():
        out_ref = torch.stack([ref(x) for _ in range(40)])
        out_fast = torch.stack([fast(x) for _ in range(40)])
    # Per output element: mean and variance over 40 dropout draws agree (the draws differ).
    assert not torch.equal(out_ref[0], out_ref[1]), "dropout is not active"
    mean_ref, mean_fast = out_ref.mean(0), out_fast.mean(0)
    std_err = ((out_ref.var(0) + out_fast.var(0)) / 40).sqrt().clamp_min(1e-6)
    z = ((mean_ref - mean_fast) / std_err).abs()
    assert z.mean() < 1.5 and (z < 5).float().mean() > 0.98, f"mean z {z.mean():.2f}"
    ratio = out_fast.var(0).mean() / out_ref.var(0).mean()
    assert 0.7 < ratio < 1.4, f"variance ratio {ratio:.3f}"


@pytest.mark.parametrize("model", list(MODELS))
def test_dropout_eval_mode_exact(model):
    ref, fast, x = _dropout_pair(model, seed=random.randrange(2**31))
    ref.eval()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model", list(MODELS))
def test_state_dict_round_trip_and_checkpoint(model, tmp_path):
    seed = random.randrange(2**31)
    ref, fast, x = build_pair(model, seed)
    fast.train()
    with torch.no_grad():
        fast(x)  # move the running stats, count num_batches_tracked
    ref.load_state_dict(fast.state_dict(), strict=True)
    for key, value in fast.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key
    path = tmp_path / "model.pt"
    torch.save(fast.state_dict(), path)
    _, reloaded, _ = build_pair(model, seed)  # same configuration, other weights
    reloaded.load_state_dict(torch.load(path), strict=True)
    reloaded.eval()
    fast.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), fast(x))


def test_backend_switch_matches_reference():
    ref, fast, x = build_pair("mmoe", random.randrange(2**31))
    ref.eval()
    fast.eval()
    with torch.no_grad():
        expected = ref(x)
        with nextrec_fast.use_backend("reference"):
            assert torch.equal(fast(x), expected)
        with nextrec_fast.use_backend("torch"):
            torch.testing.assert_close(fast(x), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="backend"):
        nextrec_fast.set_backend("cuda-magic")


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("NEXTREC_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="NEXTREC_FAST_BACKEND"):
        nextrec_fast.get_backend()


def test_training_arguments_kept():
    model = nextrec_fast.MMOE([], [nextrec_fast.SparseFeature("u", 5)], [], expert_params={"dims": [3]},
                              num_experts=2, tower_params_list=[{}], target=["y"], optimizer="sgd",
                              optimizer_params={"lr": 0.1}, loss="mse", dense_l2_reg=0.5)
    assert (model.optimizer, model.optimizer_params, model.loss, model.dense_l2_reg) == ("sgd", {"lr": 0.1}, "mse", 0.5)
    assert model({"u": torch.tensor([1, 2])}).shape == (2,)  # one task: squeezed as nextrec does


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cpu_autocast_bfloat16(model, mode):
    """Under CPU autocast the fast models follow the reference's casts (bfloat16 GEMMs): same
    outputs to bfloat16 precision, gradients for every parameter the reference gives one."""
    ref, fast, _ = _dropout_pair(model, p=0.0, seed=4)
    dense, sparse, sequence = ref.dense_features, ref.sparse_features, ref.sequence_features
    x = random_inputs(dense, sparse, sequence, batch=48, generator=torch.Generator().manual_seed(5))
    outs = []
    for m in (ref, fast):
        m.train(mode == "train")
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        out.float().sum().backward()
        outs.append(out.float())
    torch.testing.assert_close(outs[1], outs[0], rtol=5e-2, atol=5e-2)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        assert (p_ref.grad is None) == (p_fast.grad is None) or (p_fast.grad is not None and not p_fast.grad.any()), name
        if p_fast.grad is not None:
            assert torch.isfinite(p_fast.grad).all(), name
