"""accelerate / restore / patch_nextrec on the real nextrec 0.3.x models (0.6.x: test_nextrec_v06.py)."""
from __future__ import annotations

import copy
import pickle
import random

import numpy as np
import pytest
import torch

import nextrec_fast
from nextrec_fast.models import standalone
from model_factory import random_features, random_inputs, random_model_kwargs
from nextrec_generation import (assert_as_accurate, assert_regularized_grads_as_accurate, flip_rows, nextrec_float64,
                                require, skip_if_rows_collapse)

require("0.3")
from nextrec.basic import features as nr_features  # noqa: E402
from nextrec.models.multi_task.esmm import ESMM  # noqa: E402
from nextrec.models.multi_task.mmoe import MMOE  # noqa: E402
from nextrec.models.multi_task.ple import PLE  # noqa: E402

pytestmark = pytest.mark.nextrec
MODELS = {"esmm": ESMM, "mmoe": MMOE, "ple": PLE}
DROP_IN = {"esmm": standalone.ESMM, "mmoe": standalone.MMOE, "ple": standalone.PLE}
_seeds: dict[int, int] = {}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes its session folder into the working directory


def _random_model(kind, seed, **extra):
    feats = random_features(random.Random(seed), nr_features)
    kwargs = {**random_model_kwargs(kind, random.Random(seed + 1)), **extra}
    torch.manual_seed(seed)
    model = MODELS[kind](*feats, **kwargs)
    x = random_inputs(*feats, batch=8, generator=torch.Generator().manual_seed(seed))
    return model, x


def _grads(model, x, flipped: bool = False):
    model.zero_grad(set_to_none=True)
    out = model(flip_rows(x)).flip(0) if flipped else model(x)  # flipped: the same loss, summed in another order
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_accelerate_in_place_same_results(kind, mode):
    # From the suite's seeded stream (NEXTREC_FAST_TEST_SEED replays it), printed: an unseeded
    # draw here failed once in 8 CI dry runs (a tower BatchNorm bias gradient 0 against 0.56) and
    # could not be replayed.
    seed = random.randrange(2**31)
    print(f"{kind} {mode} seed={seed}")
    model, x = _random_model(kind, seed)
    plain, plain_flipped, truth = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model).double()
    plain_state = copy.deepcopy(plain.state_dict())
    _seeds[id(plain)] = seed
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    assert nextrec_fast.accelerate(model) is model
    assert isinstance(model, MODELS[kind]) and nextrec_fast.is_accelerated(model)
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == keys_before
    for m in (model, plain, plain_flipped, truth):
        m.train(mode == "train")
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    with nextrec_float64():
        skip_if_rows_collapse(truth, lambda m: m(x64), mode)
    out_plain, g_plain = _grads(plain, x)
    out_flipped, g_flipped = _grads(plain_flipped, x, flipped=True)
    out_fast, g_fast = _grads(model, x)
    with nextrec_float64():
        out_truth, g_truth = _grads(truth, x64)
    # As close to float64 nextrec as nextrec's own float32 (two runs: rows as given and reversed).
    # A fixed tolerance against float32 nextrec failed 2 draws in ~60 full-suite runs (PLE seeds
    # 1021933858 and 556075750: an embedding gradient 2.8 from nextrec's where 1.6 was allowed, in
    # draws whose gradients reach ~800): train-mode BatchNorm over 8 rows amplifies either side's
    # float32 rounding, not alike.
    assert_as_accurate({"output": out_fast}, [{"output": out_plain}, {"output": out_flipped}], {"output": out_truth},
                       what="output")
    for name, g in g_plain.items():
        if g is None:
            assert g_fast[name] is None or not g_fast[name].any(), name
    assert_as_accurate(g_fast, [g_plain, g_flipped], g_truth)
    # The accelerated model must be exactly our drop-in fast model, though: same code, same weights.
    drop_in = DROP_IN[kind](plain.dense_features, plain.sparse_features, plain.sequence_features,
                            **random_model_kwargs(kind, random.Random(_seeds[id(plain)] + 1)))
    drop_in.load_state_dict(plain_state, strict=True)
    drop_in.train(mode == "train")
    out_drop_in, g_drop_in = _grads(drop_in, x)
    assert torch.equal(out_drop_in, out_fast)
    for name, g in g_drop_in.items():
        if g is not None:
            assert torch.equal(g, g_fast[name]), name
    # state_dict both ways, strict
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    # restore gives nextrec's classes back, same object
    assert nextrec_fast.restore(model) is model
    assert type(model) is MODELS[kind] and not nextrec_fast.is_accelerated(model)
    assert type(model.embedding).__module__.startswith("nextrec.")


def test_unsupported_model_error():
    with pytest.raises(TypeError, match="supports nextrec's ESMM, MMOE and PLE .*multi_task.mmoe.MMOE"):
        nextrec_fast.accelerate(torch.nn.Linear(2, 2))


def test_accelerate_is_idempotent_and_pickles_accelerated():
    model, x = _random_model("mmoe", 3)
    nextrec_fast.accelerate(model)
    nextrec_fast.accelerate(model)
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone, MMOE) and nextrec_fast.is_accelerated(clone)  # more copies: test_copies.py
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))


def test_regularization_gradient_matches_autograd():
    model, x = _random_model("mmoe", 11)
    model._embedding_l1_reg, model._dense_l1_reg = 1e-3, 1e-3  # make both terms visible
    model._embedding_l2_reg, model._dense_l2_reg = 1e-2, 1e-2
    plain = copy.deepcopy(model)
    nextrec_fast.accelerate(model)
    # Eval mode: what is tested is the regularisation gradient; train-mode BatchNorm over this
    # small batch would amplify float32 rounding differences in the model gradient.
    assert_regularized_grads_as_accurate(plain, model, x, forward=lambda m, batch: m(batch))


def _frame(feats, n, seed):
    dense, sparse, sequence = feats
    rng = np.random.default_rng(seed)
    data = {f.name: rng.integers(0, f.vocab_size, n) for f in sparse}
    for f in sequence:
        ids = rng.integers(0, f.vocab_size, (n, f.max_len))
        ids[rng.random((n, f.max_len)) < 0.4] = f.padding_idx if f.padding_idx is not None else 0
        data[f.name] = ids
    for f in dense:
        shape = (n,) if f.input_dim == 1 else (n, f.input_dim)
        data[f.name] = rng.standard_normal(shape).astype(np.float32)
    return data


def _smooth(kwargs: dict) -> dict:
    """Every MLP with tanh: over several steps, float noise can push a pre-activation across a
    kink (relu, softshrink, hardswish, ...) in one model and not the other, a discrete change
    that training then carries on. Activations themselves are covered by the parity tests."""
    def fix(params):
        if isinstance(params, list):
            return [fix(p) for p in params]
        return {**params, "activation": "tanh"} if isinstance(params, dict) else params
    return {k: fix(v) if k.endswith(("_params", "_params_list")) and k != "optimizer_params" else v
            for k, v in kwargs.items()}


def _fit_pair(kind, optimizer, lr, seed=None):
    seed = random.randrange(2**31) if seed is None else seed  # the suite's seeded stream
    feats = random_features(random.Random(seed), nr_features)
    kwargs = _smooth(random_model_kwargs(kind, random.Random(seed + 1)))
    if kind == "esmm":
        kwargs.update(target=["ctr", "ctcvr"])
    targets = kwargs.get("target", ["ctr", "ctcvr"])
    kwargs.update(optimizer=optimizer, optimizer_params={"lr": lr})
    torch.manual_seed(seed)
    plain = MODELS[kind](*feats, **kwargs)
    fast = MODELS[kind](*feats, **kwargs)
    fast.load_state_dict(plain.state_dict())
    # A third, plain run from weights moved by float32 rounding: how far this configuration's
    # training carries rounding differences, the yardstick for plain vs accelerated.
    rounded = MODELS[kind](*feats, **kwargs)
    rounded.load_state_dict({k: v * (1 + 2**-23) if v.is_floating_point() else v
                             for k, v in plain.state_dict().items()})
    # A fourth run in float64, the exact trajectory (accelerated: nextrec's own sequence pooling
    # is float32-only; in float64 the fast path equals nextrec's formulas to ~1e-12).
    exact = MODELS[kind](*feats, **kwargs)
    exact.load_state_dict(plain.state_dict())
    exact.double()
    for model in (plain, fast, rounded, exact):
        model.compile(optimizer=optimizer, optimizer_params={"lr": lr}, loss="bce")
    nextrec_fast.accelerate(fast)
    nextrec_fast.accelerate(exact)
    exact.loss_fn = [_labels_as_predictions(fn) for fn in exact.loss_fn]  # nextrec's labels are float32
    data = _frame(feats, 96, seed)  # a dict of arrays: nextrec's DataFrame path cannot take 2-D dense columns
    rng = np.random.default_rng(seed)
    for t in targets:
        data[t] = rng.integers(0, 2, 96).astype(np.float32)
    for model in (plain, fast, rounded, exact):
        torch.manual_seed(0)  # the same shuffling for all
        model.fit(data, epochs=2, batch_size=32, shuffle=True, metrics=["auc"])
    preds = [np.asarray(m.predict(data, batch_size=64), dtype=float) for m in (plain, fast, rounded, exact)]
    return plain, fast, rounded, exact, preds


def _labels_as_predictions(loss_fn):
    return lambda pred, target: loss_fn(pred, target.to(pred.dtype))


def _assert_fit_close(name, fast, plain, rounded, exact):
    """fast (accelerated float32) agrees with plain (nextrec float32): within rtol 1e-3 / atol
    5e-5, or no further from plain than rounding alone carries it in this configuration, or at
    least as close to the exact (float64) trajectory as plain itself is. The last case is for
    configurations where train-mode BatchNorm amplifies the rounding of nextrec's float32 batch
    statistics (summed in double in the fast path): there plain itself drifts from the exact
    training by more than the rounding yardstick, and the fast run drifts less."""
    fast, plain, rounded, exact = (np.asarray(t, dtype=float) for t in (fast, plain, rounded, exact))
    carried = np.abs(rounded - plain).max()
    gap = np.abs(fast - plain) - (1e-3 * np.abs(plain) + max(5e-5, 4 * carried))
    if (gap <= 0).all():
        return
    err_fast, err_plain = np.abs(fast - exact).max(), np.abs(plain - exact).max()
    assert err_fast <= max(2 * err_plain, 5e-5), (
        f"{name}: fast differs from nextrec by {np.abs(fast - plain).max():.3g} (rounding alone carries "
        f"{carried:.3g}); from the float64 run: fast {err_fast:.3g}, nextrec {err_plain:.3g}")


@pytest.mark.parametrize("kind", ["mmoe", "ple", "esmm"])
def test_fit_plain_vs_accelerated_sgd(kind):
    """Two epochs of nextrec's own fit loop (regularisation, clipping, SGD): same parameters."""
    plain, fast, rounded, exact, preds = _fit_pair(kind, "sgd", 0.05)
    states = [m.state_dict() for m in (fast, plain, rounded, exact)]
    for name, p_plain in states[1].items():
        if not p_plain.is_floating_point():
            assert torch.equal(states[0][name], p_plain), name  # num_batches_tracked
            continue
        _assert_fit_close(name, *(s[name].double() for s in states))
    pred_plain, pred_fast, pred_rounded, pred_exact = preds
    _assert_fit_close("predictions", pred_fast, pred_plain, pred_rounded, pred_exact)


@pytest.mark.parametrize("kind", ["mmoe", "ple"])
def test_fit_plain_vs_accelerated_adam(kind):
    """With Adam (fused when accelerated): Adam scales float noise in near-zero gradients (e.g. a
    bias before train-mode BatchNorm) up to lr-sized steps in BOTH models, so after a few steps
    the runs agree to about lr, not to float precision; the step itself is checked exactly in
    test_fused_adam_step_matches."""
    _, _, _, _, (pred_plain, pred_fast, _, _) = _fit_pair(kind, "adam", 1e-3)
    np.testing.assert_allclose(pred_fast, pred_plain, rtol=0, atol=5e-3)


def test_fused_adam_step_matches():
    model, x = _random_model("mmoe", 21)
    plain = copy.deepcopy(model)
    plain.compile(optimizer="adam", optimizer_params={"lr": 1e-2}, loss="bce")
    model.compile(optimizer="adam", optimizer_params={"lr": 1e-2}, loss="bce")
    nextrec_fast.accelerate(model)
    assert model.optimizer_fn.param_groups[0]["fused"] and not plain.optimizer_fn.param_groups[0].get("fused")
    for _ in range(3):
        for m in (plain, model):
            m.optimizer_fn.zero_grad()
            for p in m.parameters():  # the same gradients for both: only the optimiser differs
                p.grad = torch.sin(torch.arange(p.numel(), dtype=p.dtype) * 0.37).view_as(p)
            m.optimizer_fn.step()
    for (name, p_plain), p_fast in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(p_fast, p_plain, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    nextrec_fast.restore(model)
    assert not model.optimizer_fn.param_groups[0]["fused"]


def _biases_before_batchnorm(model) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], torch.nn.Linear) and isinstance(module[i + 1], torch.nn.BatchNorm1d):
                    names.add(f"{prefix}.{i}.bias" if prefix else f"{i}.bias")
    return names


def test_checkpoints_cross_load(tmp_path):
    session = f"ckpt_{random.Random().randrange(2**31)}"  # a folder of its own for the checkpoint
    model, x = _random_model("ple", 5, session_id=session)
    nextrec_fast.accelerate(model)
    model.save_model(verbose=False)  # into the session folder, beside nextrec's features_config.pkl
    plain, _ = _random_model("ple", 5)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)  # so that loading has to happen for the outputs to agree
    plain.load_model(model.session_path, verbose=False)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_patch_and_unpatch():
    try:
        nextrec_fast.patch_nextrec()
        nextrec_fast.patch_nextrec()  # idempotent
        patched, _ = _random_model("esmm", 2)
        assert nextrec_fast.is_accelerated(patched)
    finally:
        nextrec_fast.unpatch_nextrec()
    plain, _ = _random_model("esmm", 2)
    assert not nextrec_fast.is_accelerated(plain) and type(plain) is ESMM


@pytest.mark.parametrize("shuffle", [True, False])
def test_fast_data_path_gives_nextrec_batches(shuffle):
    model, _ = _random_model("mmoe", 4)
    plain = copy.deepcopy(model)
    nextrec_fast.accelerate(model)
    feats = (model.dense_features, model.sparse_features, model.sequence_features)
    data = _frame(feats, 50, 4)
    for t in model.target:
        data[t] = np.arange(50, dtype=np.float32)
    batches = []
    for m in (plain, model):
        torch.manual_seed(123)
        loader = m._prepare_data_loader(data, batch_size=16, shuffle=shuffle)
        assert loader.batch_size == 16 and len(loader) == 4
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 4
    for b_plain, b_fast in zip(*batches):
        for section in ("features", "labels"):
            assert b_plain[section].keys() == b_fast[section].keys()
            for name in b_plain[section]:
                assert torch.equal(b_plain[section][name], b_fast[section][name]), (section, name)


def test_drop_ins_are_nextrecs_classes_accelerated():
    """``from nextrec_fast import MMOE`` under 0.3: nextrec 0.3's class (its signature, ``fit``,
    ...), accelerated when built; nextrec's checkpoint loads strictly, same outputs."""
    import inspect

    from nextrec_fast.models import v03
    assert (nextrec_fast.ESMM, nextrec_fast.MMOE, nextrec_fast.PLE) == (v03.ESMM, v03.MMOE, v03.PLE)
    assert inspect.signature(v03.MMOE) == inspect.signature(MMOE)
    for kind, cls in (("esmm", v03.ESMM), ("mmoe", v03.MMOE), ("ple", v03.PLE)):
        seed = random.randrange(2**31)  # the suite's seeded stream: replayable
        plain, x = _random_model(kind, seed)
        feats = (plain.dense_features, plain.sparse_features, plain.sequence_features)
        drop_in = cls(*feats, **random_model_kwargs(kind, random.Random(seed + 1)))
        assert isinstance(drop_in, MODELS[kind]) and nextrec_fast.is_accelerated(drop_in)
        assert all(callable(getattr(drop_in, n, None)) for n in ("compile", "fit", "predict", "save_model"))
        drop_in.load_state_dict(plain.state_dict(), strict=True)
        plain.eval()
        drop_in.eval()
        with torch.no_grad():
            torch.testing.assert_close(drop_in(x), plain(x), rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind} {seed}: {m}")


def test_default_drop_ins_without_nextrec(monkeypatch):
    """Without nextrec, ``nextrec_fast.MMOE`` is the newest generation's plain-module drop-in (0.6's
    API); 0.3.1's stays at its pinned paths (``nextrec_fast.models.standalone``, and ``v03``
    without nextrec)."""
    from nextrec_fast import models
    from nextrec_fast.models import standalone_v06
    monkeypatch.setattr(models, "_has_module", lambda name: False)
    assert nextrec_fast.MMOE is standalone_v06.MMOE and nextrec_fast.PLE is standalone_v06.PLE
    import inspect
    assert "expert_params" in inspect.signature(standalone.MMOE).parameters  # 0.3.1's names
    assert "expert_mlp_params" in inspect.signature(standalone_v06.MMOE).parameters  # 0.6's
