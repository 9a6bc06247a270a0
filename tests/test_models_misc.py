"""Dropout, state_dict round trips, checkpoints and the backend switch of the fast models."""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

import nextrec_fast
from nextrec_fast.models import standalone
from nextrec_fast import reference
from model_factory import random_features, random_inputs, random_model_kwargs
from test_model_parity import MODELS, build_pair

# Seeds: fresh each run, printed by every test that draws one; NEXTREC_FAST_TEST_SEED replays a run.
RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))


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


def permutation_p_values(a: torch.Tensor, b: torch.Tensor, permutations: int, seed: int) -> tuple[float, float]:
    """Monte-Carlo permutation p-values that draws ``a`` ([N, M]) and ``b`` ([N, M]) come from one
    distribution, for two statistics: the mean squared difference of the per-element means, and
    |log| of the ratio of the mean per-element variances.

    Under the null hypothesis (i.i.d. draws, one distribution) the 2N draws are exchangeable, so
    ``P(p <= alpha) <= alpha`` exactly, whatever the distribution and however the M elements of a
    draw depend on each other (they do: train-mode BatchNorm couples every row of a batch)."""
    pooled = torch.cat([a, b]).double()
    n, total = a.shape[0], pooled.shape[0]
    squares = pooled * pooled

    def stats(labels):  # labels: [K, 2N] of 0/1, n ones per row (the draws called "a")
        mean_a, mean_b = labels @ pooled / n, (1 - labels) @ pooled / n
        var_a = (labels @ squares / n - mean_a * mean_a).mean(1) * n / (n - 1)
        var_b = ((1 - labels) @ squares / n - mean_b * mean_b).mean(1) * n / (n - 1)
        return (mean_a - mean_b).pow(2).mean(1), (var_a / var_b).log().abs()

    observed = torch.zeros(1, total, dtype=torch.float64)
    observed[0, :n] = 1
    obs_mean, obs_var = stats(observed)
    generator = torch.Generator().manual_seed(seed)
    above_mean = above_var = 0
    for start in range(0, permutations, 4096):
        k = min(4096, permutations - start)
        order = torch.rand(k, total, generator=generator).argsort(1)
        labels = (order < n).double()
        perm_mean, perm_var = stats(labels)
        above_mean += int((perm_mean >= obs_mean).sum())
        above_var += int((perm_var >= obs_var).sum())
    return (1 + above_mean) / (1 + permutations), (1 + above_var) / (1 + permutations)


# Both p-values below ALPHA fail the test; each has a false-failure rate of at most ALPHA under
# the null hypothesis (the permutation test is exact), so the test as a whole: at most 1e-4.
_DROPOUT_ALPHA = 5e-5
_DROPOUT_PERMUTATIONS = 40_000  # smallest reachable p-value 1/40001 < ALPHA


@pytest.mark.parametrize("model", list(MODELS))
def test_dropout_same_distribution(model):
    """Fast and reference outputs under train-mode dropout have one distribution (their masks
    differ, so only the distribution can be compared): an exact permutation test on 80 i.i.d.
    draws each, false-failure rate at most 1e-4 (see ``_DROPOUT_ALPHA``)."""
    seed = RUN_SEED + sum(map(ord, model))
    print(f"seed={seed} (NEXTREC_FAST_TEST_SEED={RUN_SEED})")
    ref, fast, x = _dropout_pair(model, seed=seed)
    ref.train()
    fast.train()
    draws = 80
    torch.manual_seed(seed)
    with torch.no_grad():
        out_ref = torch.stack([ref(x).flatten() for _ in range(draws)])
        out_fast = torch.stack([fast(x).flatten() for _ in range(draws)])
    assert not torch.equal(out_ref[0], out_ref[1]), "dropout is not active"
    p_mean, p_var = permutation_p_values(out_ref, out_fast, _DROPOUT_PERMUTATIONS, seed)
    print(f"p(mean)={p_mean:.2e} p(variance)={p_var:.2e}")
    assert p_mean > _DROPOUT_ALPHA, f"per-element means differ: permutation p={p_mean:.2e} (seed {seed})"
    assert p_var > _DROPOUT_ALPHA, f"variances differ: permutation p={p_var:.2e} (seed {seed})"


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
    model = standalone.MMOE([], [nextrec_fast.features.SparseFeature("u", 5)], [], expert_params={"dims": [3]},
                              num_experts=2, tower_params_list=[{}], target=["y"], optimizer="sgd",
                              optimizer_params={"lr": 0.1}, loss="mse", dense_l2_reg=0.5)
    assert (model.optimizer, model.optimizer_params, model.loss, model.dense_l2_reg) == ("sgd", {"lr": 0.1}, "mse", 0.5)
    assert model({"u": torch.tensor([1, 2])}).shape == (2,)  # one task: squeezed as nextrec does


def test_skip_if_rows_collapse_flags_only_constant_channels():
    """The parity tests' guard (nextrec_generation.skip_if_rows_collapse): a train-mode BatchNorm
    channel that sees the same value on every row is an ill-posed draw; tiny but real spread
    (nextrec's 1e-4-sized embeddings) and eval mode are not."""
    from nextrec_generation import skip_if_rows_collapse
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.ReLU()).double()
    same_rows = torch.full((5, 3), 0.1, dtype=torch.float64)
    tiny_spread = 1e-4 * torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(pytest.skip.Exception, match=r"ill-posed draw.*1\[0\], 1\[1\]"):
        skip_if_rows_collapse(mlp, lambda m: m(same_rows), "train")
    skip_if_rows_collapse(mlp, lambda m: m(tiny_spread), "train")
    skip_if_rows_collapse(mlp, lambda m: m(same_rows), "eval")
    assert mlp[1].num_batches_tracked.item() == 0  # it probed a copy
