"""accelerate(model, embedding_optimizer=...) inside nextrec's own fit (whichever nextrec is
installed): the tables are updated in the pooling backward, nextrec's optimiser updates the rest."""
import pytest
import torch

import nextrec_fast
from nextrec_fast import optim
from nextrec_fast.bench.common import CONFIGS, default_features, make_batch
from nextrec_fast.bench.models import default_model_kwargs, installed_nextrec, nextrec_model
from nextrec_fast.bench.nextrec_fit import _user_data
from nextrec_fast.ops import pooled_embedding as pe

pytestmark = [pytest.mark.nextrec,
              pytest.mark.skipif(installed_nextrec() is None, reason="needs nextrec (0.3.x or 0.6.x)"),
              pytest.mark.skipif(not pe.is_available(), reason="needs the C++ pooling op")]


def _models(kind):
    features = default_features(**CONFIGS["small"])
    # nextrec 0.3.1's models regularise their tables by default, which needs dense gradients
    kwargs = {**default_model_kwargs(kind), "embedding_l1_reg": 0.0, "embedding_l2_reg": 0.0}
    plain = nextrec_model(kind, features, kwargs, seed=0)
    fast = nextrec_model(kind, features, kwargs, seed=1)
    fast.load_state_dict(plain.state_dict())
    return features, plain, fast


def _fit(model, data):
    model.compile(optimizer="sgd", optimizer_params={"lr": 0.05}, loss="bce")
    # No clipping: it scales every gradient by the norm over all of them, tables included.
    model._max_gradient_norm = model.max_gradient_norm = 1e12
    torch.manual_seed(0)
    model.fit(data, epochs=1, batch_size=64, shuffle=False, metrics=["auc"])


@pytest.mark.parametrize("kind", ["mmoe", "esmm"])
def test_sgd_in_backward_equals_nextrecs_sgd(kind, tmp_path, monkeypatch):
    """SGD on the rows a batch touched is SGD on the dense gradient (the other rows' gradient is
    zero): accelerated with SGD tables in backward, nextrec's fit ends where the accelerated
    model's fit with nextrec's SGD on everything does. (Accelerated against plain nextrec, fit
    parity is tests/test_integration.py's and test_nextrec_v06.py's, with a rounding yardstick.)"""
    monkeypatch.chdir(tmp_path)  # nextrec writes logs and checkpoints here
    features, plain, fast = _models(kind)
    nextrec_fast.accelerate(plain)
    nextrec_fast.accelerate(fast, embedding_optimizer=(torch.optim.SGD, {"lr": 0.05}))
    assert isinstance(fast.embedding_optimizer, optim.EmbeddingOptimizerInBackward)
    x, labels = make_batch(*features, batch=256, device="cpu", seed=3)
    targets = list(getattr(plain, "target_columns", None) or plain.target)
    data = _user_data(x, labels, {f.name for f in features[2]}, targets)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    for m in (plain, fast):
        _fit(m, data)
    tables = fast.embedding.tables()
    assert all(t.grad is None for t in tables)
    got, exp = fast.state_dict(), plain.state_dict()
    moved = 0
    for name, value in exp.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        moved += not torch.equal(got[name], before[name])
    assert moved > len(tables)  # tables and dense parameters trained
    nextrec_fast.restore(fast)
    assert not hasattr(fast, "embedding_optimizer") and all(optim.in_backward_optimizer(t) is None for t in tables)


def test_regularised_tables_are_refused_and_the_model_left_as_it_was():
    features, plain, fast = _models("mmoe")
    for attr in ("_embedding_l2_reg", "embedding_l2_reg"):
        if hasattr(fast, attr):
            setattr(fast, attr, 1e-4)
    with pytest.raises(nextrec_fast.UnsupportedModelError, match="regularised"):
        nextrec_fast.accelerate(fast, embedding_optimizer=(optim.RowWiseAdagrad, {"lr": 0.1}))
    assert not nextrec_fast.is_accelerated(fast)
    assert all(optim.in_backward_optimizer(t) is None for t in fast.embedding.parameters())
    with pytest.raises(TypeError, match="optimizer_class, kwargs"):
        nextrec_fast.accelerate(plain, embedding_optimizer=optim.RowWiseAdagrad)
    assert not nextrec_fast.is_accelerated(plain)
    with pytest.raises(ValueError, match="momentum"):  # the optimiser's own options: checked after the swap, undone
        nextrec_fast.accelerate(plain, embedding_optimizer=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}))
    assert not nextrec_fast.is_accelerated(plain)
    assert all(optim.in_backward_optimizer(t) is None for t in plain.embedding.parameters())


def test_accelerating_again_with_other_options_is_refused_not_ignored():
    """accelerate() on an accelerated model (the README's, a drop-in, patch_nextrec) used to
    return it unchanged whatever was asked: an embedding_optimizer or other switches were
    silently dropped. The same switches stay a no-op; others raise, saying what to do."""
    _, plain, _ = _models("mmoe")
    nextrec_fast.accelerate(plain)
    assert nextrec_fast.accelerate(plain) is plain
    with pytest.raises(ValueError, match="already accelerated.*embedding_optimizer.*restore"):
        nextrec_fast.accelerate(plain, embedding_optimizer=(optim.RowWiseAdagrad, {"lr": 0.1}))
    with pytest.raises(ValueError, match="already accelerated.*fast_data"):
        nextrec_fast.accelerate(plain, fast_data=False)
    assert not hasattr(plain, "embedding_optimizer")
    assert all(optim.in_backward_optimizer(t) is None for t in plain.embedding.tables())
    nextrec_fast.restore(plain)
    nextrec_fast.accelerate(plain, embedding_optimizer=(optim.RowWiseAdagrad, {"lr": 0.1}))
    assert isinstance(plain.embedding_optimizer, optim.EmbeddingOptimizerInBackward)
