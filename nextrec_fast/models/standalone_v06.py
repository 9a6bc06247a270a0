"""Drop-in fast ESMM, MMOE and PLE as plain ``nn.Module``s, with nextrec 0.6.x's API.

Each takes nextrec 0.6's constructor arguments (``expert_mlp_params={"hidden_dims": [...],
"norm_type": ...}``, ``tower_mlp_params_list``, ...) and features (``nextrec_fast.features.v06``
or nextrec 0.6's own), owns exactly the modules nextrec 0.6's model owns (same ``state_dict``
keys: a 0.6 checkpoint's model state loads with ``strict=True``; the same weights as nextrec
under the same ``torch.manual_seed``), and computes what it computes: ``forward`` returns logits
``[B, T]``, ``call_model(x)`` the head's probabilities, ``training_adapter.forward(model, x)``
what nextrec's ``predict`` gives (ESMM: ``[ctr, ctcvr]``). No nextrec needed, and no ``fit``:
train it in your own loop. (With nextrec 0.6 installed, ``nextrec_fast.models.v06`` gives
nextrec's own classes accelerated, with ``fit``.)
"""
from __future__ import annotations

import torch  # noqa: F401  (the docstring examples)

from nextrec_fast import compat
from nextrec_fast.layers.embedding import FastEmbeddingMixin
from nextrec_fast.models.forwards import FastESMMForward, FastMMOEForward, FastPLEForward
from nextrec_fast.models.standalone import fast_after_init
from nextrec_fast.reference import v06

__all__ = ["ESMM", "MMOE", "PLE", "FastEmbeddingLayer"]


class FastEmbeddingLayer(FastEmbeddingMixin, v06.EmbeddingLayer):
    """nextrec 0.6's EmbeddingLayer (the reference's copy of it) with the batched forward."""

    _compat = compat.V06

    def __init__(self, features: list):
        super().__init__(features)
        self._prepare_fast_path()


_COMMON_ARGS = """
    dense_features, sparse_features, sequence_features (list): nextrec 0.6 feature objects
        (``nextrec_fast.features.v06`` or ``nextrec.basic.features``).
    target (list[str]): one name per task; task (str | list[str] | None): "binary" (default) or
        "regression" per task.
    key_columns, training_mode ("pointwise" only), sampling_mode, embedding_l1_reg, dense_l1_reg,
    embedding_l2_reg, dense_l2_reg, device, session_id: nextrec 0.6's ``Model`` arguments, kept as
        attributes (``add_reg_loss()`` gives the regularisation term as nextrec's does).

Call Args:
    x (dict[str, Tensor]): per feature: sparse ids ``[B]`` (int), sequence ids ``[B, L]`` (int,
        padded with the feature's ``padding_idx``; the last ``max_len`` are used), dense values
        ``[B]`` or ``[B, input_dim]`` (float).

Raises:
    TypeError: nextrec 0.3.1's argument names or features (the message gives 0.6's).
    ValueError / TypeError naming the feature: missing keys, float ids, ids out of range, wrong
        shapes or devices, an empty batch, a batch of one in training mode with BatchNorm.
"""


class ESMM(FastESMMForward, v06.ESMM):
    __doc__ = """Entire Space Multi-task Model (Ma et al., SIGIR 2018) with nextrec 0.6's API.

Args:
    ctr_mlp_params, cvr_mlp_params (dict): the towers' MLPs: ``{"hidden_dims": [...],
        "activation": "relu", "dropout": 0.0, "norm_type": "none" | "batch_norm" | "layer_norm"}``
        (each then a Linear to 1).
""" + _COMMON_ARGS + """
Returns:
    Tensor ``[B, 2]``: (ctr, cvr) tower logits; ``call_model(x)``: ``sigmoid(logits +
    head.prediction.bias)`` (the head's bias is a trainable parameter, as in nextrec 0.6);
    ``training_adapter.forward(model, x)``: (CTR, CTCVR = CTR * CVR), what nextrec trains on.

Example:
    >>> from nextrec_fast.features.v06 import SparseFeature
    >>> model = ESMM([], [SparseFeature("user", 100, embedding_dim=8)], [], ctr_mlp_params={"hidden_dims": [16]},
    ...              cvr_mlp_params={"hidden_dims": [16]}).eval()
    >>> assert model.training_adapter.forward(model, {"user": torch.tensor([1, 2, 3])}).shape == (3, 2)
"""
    _compat = compat.V06
    __init__ = fast_after_init(v06.ESMM.__init__, FastEmbeddingLayer)


class MMOE(FastMMOEForward, v06.MMOE):
    __doc__ = """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) with nextrec 0.6's API.

Args:
    expert_mlp_params (dict): each expert's MLP, ``{"hidden_dims": [...], "activation": ...,
        "dropout": ..., "norm_type": ...}`` (no output layer).
    num_experts (int = 3): shared experts; one softmax gate per task weighs them.
    tower_mlp_params_list (list[dict]): one tower MLP per task (each ending in a Linear to 1;
        ``output_activation`` optional).
""" + _COMMON_ARGS + """
Returns:
    Tensor ``[B, T]``: tower logits; ``call_model(x)``: ``sigmoid(logits + head.prediction.bias)``
    for "binary" tasks (the head's bias is a trainable parameter, as in nextrec 0.6: train on
    ``call_model``'s output, as nextrec's fit does, or on ``model.head(model(x))``).

Example:
    >>> from nextrec_fast.features.v06 import SparseFeature
    >>> model = MMOE([], [SparseFeature("user", 100, embedding_dim=8)], [], expert_mlp_params={"hidden_dims": [16]},
    ...              num_experts=4, tower_mlp_params_list=[{"hidden_dims": [8]}] * 2, target=["click", "buy"]).eval()
    >>> assert model.call_model({"user": torch.tensor([1, 2, 3])}).shape == (3, 2)
"""
    _compat = compat.V06
    __init__ = fast_after_init(v06.MMOE.__init__, FastEmbeddingLayer)


class PLE(FastPLEForward, v06.PLE):
    __doc__ = """Progressive Layered Extraction (Tang et al., RecSys 2020) with nextrec 0.6's API.

Args:
    shared_expert_mlp_params (dict), specific_expert_mlp_params (list[dict], one per task): expert
        MLPs; every expert of a level outputs the same width.
    num_shared_experts, num_specific_experts (int): experts per CGC level (specific: per task).
    num_levels (int): stacked CGC levels.
    tower_mlp_params_list (list[dict]): one tower MLP per task.
""" + _COMMON_ARGS + """
Returns:
    Tensor ``[B, T]``: tower logits; ``call_model(x)``: ``sigmoid(logits + head.prediction.bias)``
    for "binary" tasks (the head's bias is a trainable parameter, as in nextrec 0.6: train on
    ``call_model``'s output, as nextrec's fit does, or on ``model.head(model(x))``).

Example:
    >>> from nextrec_fast.features.v06 import SparseFeature
    >>> model = PLE([], [SparseFeature("user", 100, embedding_dim=8)], [],
    ...             shared_expert_mlp_params={"hidden_dims": [16]},
    ...             specific_expert_mlp_params=[{"hidden_dims": [16]}] * 2, num_shared_experts=2,
    ...             num_specific_experts=1, num_levels=2, tower_mlp_params_list=[{"hidden_dims": [8]}] * 2,
    ...             target=["click", "buy"]).eval()
    >>> assert model.call_model({"user": torch.tensor([1, 2, 3])}).shape == (3, 2)
"""
    _compat = compat.V06
    __init__ = fast_after_init(v06.PLE.__init__, FastEmbeddingLayer)
