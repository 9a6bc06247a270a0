"""Bad input gives a clear error naming the feature or the cause, never a crash or a wrong result."""
from __future__ import annotations

import pytest
import torch

from nextrec_fast.models import standalone
from nextrec_fast import MissingFeatureError
from nextrec_fast.features import DenseFeature, SequenceFeature, SparseFeature


def _model(**overrides):
    dense = [DenseFeature("price"), DenseFeature("vec", input_dim=3, embedding_dim=None)]
    sparse = [SparseFeature("user", 10, embedding_dim=4), SparseFeature("item", 20, embedding_dim=4)]
    sequence = [SequenceFeature("hist", 20, max_len=5, embedding_name="item", embedding_dim=4, padding_idx=0)]
    kwargs = dict(expert_params={"dims": [8]}, num_experts=2, tower_params_list=[{"dims": [4]}] * 2,
                  target=["a", "b"], task=["binary", "binary"])
    kwargs.update(overrides)
    return standalone.MMOE(dense, sparse, sequence, **kwargs)


def _batch(b=4):
    return {"price": torch.randn(b), "vec": torch.randn(b, 3), "user": torch.randint(0, 10, (b,)),
            "item": torch.randint(0, 20, (b,)), "hist": torch.randint(0, 20, (b, 7))}


def test_valid_batch_runs():
    assert _model()(_batch()).shape == (4, 2)


def test_missing_feature():
    x = _batch()
    del x["item"]
    with pytest.raises(MissingFeatureError, match="item"):
        _model()(x)
    with pytest.raises(KeyError):  # also what nextrec raises
        _model()(x)


@pytest.mark.parametrize("name", ["user", "hist"])
def test_float_ids(name):
    x = _batch()
    x[name] = x[name].float()
    with pytest.raises(TypeError, match=f"{name}.*integer"):
        _model()(x)


@pytest.mark.parametrize("name,value", [("user", 10), ("user", -1), ("hist", 20), ("hist", -3), ("item", 10**9)])
def test_out_of_range_ids(name, value):
    x = _batch()
    x[name].view(-1)[-1] = value  # the last position: kept by max_len truncation
    with pytest.raises(ValueError, match=rf"{name}.*{value}.*out of range"):
        _model()(x)


def test_wrong_shapes():
    x = _batch()
    x["user"] = x["user"].view(2, 2)
    with pytest.raises(ValueError, match="user.*shape"):
        _model()(x)
    x = _batch()
    x["hist"] = x["hist"][:, 0]
    with pytest.raises(ValueError, match="hist.*\\[B, L\\]"):
        _model()(x)
    x = _batch()
    x["vec"] = torch.randn(4, 2)
    with pytest.raises(ValueError, match="vec.*3"):
        _model()(x)
    x = _batch()
    x["item"] = x["item"][:3]
    with pytest.raises(ValueError, match="item.*batch size 3"):
        _model()(x)


def test_not_a_tensor_or_dict():
    x = _batch()
    x["user"] = x["user"].tolist()
    with pytest.raises(TypeError, match="user"):
        _model()(x)
    x["user"] = _batch()["user"].numpy()
    with pytest.raises(TypeError, match="'user'.*ndarray.*torch.as_tensor"):
        _model()(x)
    with pytest.raises(TypeError, match="dict"):
        _model()([1, 2])


def test_mismatched_device():
    model = _model().to(torch.device("meta"))
    with pytest.raises(ValueError, match="user.*cpu.*meta"):
        model(_batch())


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        _model()(_batch(0))


def test_batch_of_one_in_training_mode():
    model = _model()
    with pytest.raises(ValueError, match="BatchNorm.*batch of 1.*eval.*last batch of one row in nextrec's fit.*drop_last"):
        model(_batch(1))
    model.eval()
    assert model(_batch(1)).shape == (1, 2)  # eval mode is fine, as in nextrec


def test_concat_sequence_shorter_than_max_len():
    sequence = [SequenceFeature("hist", 20, max_len=5, embedding_dim=2, combiner="concat")]
    model = standalone.ESMM([], [SparseFeature("user", 10)], sequence, ctr_params={"dims": [3]},
                              cvr_params={"dims": [3]})
    with pytest.raises(ValueError, match="hist.*concat.*max_len=5.*3 positions"):
        model({"user": torch.zeros(4, dtype=torch.long), "hist": torch.zeros(4, 3, dtype=torch.long)})


def test_bad_configuration():
    with pytest.raises(ValueError, match="activation"):
        _model(expert_params={"dims": [8], "activation": "nope"})
    with pytest.raises(ValueError, match="tower params"):
        _model(tower_params_list=[{"dims": [4]}])
    with pytest.raises(ValueError, match="combiner"):
        standalone.ESMM([], [], [SequenceFeature("h", 5, combiner="max")], ctr_params={}, cvr_params={})
    with pytest.raises(ValueError, match="d.*use_embedding"):
        standalone.ESMM([DenseFeature("d", embedding_dim=1, input_dim=3)], [SparseFeature("u", 4)], [],
                          ctr_params={}, cvr_params={})
    with pytest.raises(TypeError, match="Unsupported feature type"):
        standalone.ESMM([object()], [], [], ctr_params={}, cvr_params={})
