"""Drop-in fast ESMM, MMOE and PLE as plain ``nn.Module``s, with nextrec 0.3.1's API.

Each takes nextrec 0.3.1's constructor arguments (and its feature objects, or
``nextrec_fast.features``' copies of them) and owns exactly the modules nextrec's model owns, so
``state_dict`` keys are nextrec's and a nextrec 0.3.1 checkpoint loads with ``strict=True``; it
returns nextrec 0.3.1's probabilities. No nextrec needed. (With nextrec installed,
``nextrec_fast.models.v03`` / ``v06`` give nextrec's own classes accelerated, with ``fit``.)
"""
from __future__ import annotations

import functools

import torch  # noqa: F401  (the docstring examples)

from nextrec_fast import reference
from nextrec_fast.layers.embedding import FastEmbeddingMixin
from nextrec_fast.models.forwards import FastESMMForward, FastMMOEForward, FastPLEForward

__all__ = ["ESMM", "MMOE", "PLE", "FastEmbeddingLayer", "fast_after_init"]


class FastEmbeddingLayer(FastEmbeddingMixin, reference.EmbeddingLayer):
    """nextrec 0.3's EmbeddingLayer (the reference's copy of it) with the batched forward."""

    def __init__(self, features: list):
        super().__init__(features)
        self._prepare_fast_path()


def fast_after_init(init, layer_class):
    """``__init__`` of a drop-in: the reference's own (real signature, via ``__wrapped__``), then
    ``layer_class`` (a fast embedding layer) over the same parameters: only the embedding layer's
    class, and so its forward, changes; parameters and ``state_dict`` keys stay."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.embedding.__class__ = layer_class
        self.embedding._prepare_fast_path()
    return __init__


_COMMON_ARGS = """
    dense_features, sparse_features, sequence_features (list): nextrec 0.3.1 feature objects
        (``nextrec.basic.features`` or ``nextrec_fast.features``).
    target (list[str]), task (str | list[str] = "binary"): one entry per task.
    optimizer, optimizer_params, loss, loss_params, device, embedding_l1_reg, dense_l1_reg,
    embedding_l2_reg, dense_l2_reg: nextrec's training arguments, kept as attributes (this
        module has no ``fit``; ``nextrec_fast.models.v03`` keeps nextrec's).

Call Args:
    x (dict[str, Tensor]): per feature: sparse ids ``[B]`` (int), sequence ids ``[B, L]`` (int,
        padded with the feature's padding id), dense values ``[B]`` or ``[B, input_dim]`` (float).

Raises:
    ValueError / TypeError naming the feature: missing keys, float ids, ids out of range, wrong
    shapes or devices, an empty batch, a batch of one in training mode with BatchNorm.
"""


class ESMM(FastESMMForward, reference.ESMM):
    __doc__ = """Entire Space Multi-task Model (Ma et al., SIGIR 2018) with nextrec 0.3.1's API.

Args:
    ctr_params, cvr_params (dict): the towers' MLPs: ``{"dims": [...], "activation": "relu",
        "dropout": 0.0}`` (Linear -> BatchNorm1d -> activation -> Dropout per layer, then Linear to 1).
""" + _COMMON_ARGS + """
Returns:
    Tensor ``[B, 2]``: (CTR, CTCVR = CTR * CVR), probabilities.

Example:
    >>> from nextrec_fast.features import SparseFeature
    >>> model = ESMM([], [SparseFeature("user", 100, embedding_dim=8)], [], ctr_params={"dims": [16]},
    ...              cvr_params={"dims": [16]}).eval()
    >>> assert model({"user": torch.tensor([1, 2, 3])}).shape == (3, 2)
"""
    __init__ = fast_after_init(reference.ESMM.__init__, FastEmbeddingLayer)


class MMOE(FastMMOEForward, reference.MMOE):
    __doc__ = """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) with nextrec 0.3.1's API.

Args:
    expert_params (dict): each expert's MLP, ``{"dims": [...], "activation": ..., "dropout": ...}``.
    num_experts (int = 3): shared experts; one softmax gate per task weighs them.
    tower_params_list (list[dict]): one tower MLP per task (ending in a Linear to 1).
""" + _COMMON_ARGS + """
Returns:
    Tensor ``[B, num_tasks]`` (``[B]`` for one task): probabilities (binary tasks).

Example:
    >>> from nextrec_fast.features import SparseFeature
    >>> model = MMOE([], [SparseFeature("user", 100, embedding_dim=8)], [], expert_params={"dims": [16]},
    ...              num_experts=4, tower_params_list=[{"dims": [8]}] * 2, target=["click", "buy"]).eval()
    >>> assert model({"user": torch.tensor([1, 2, 3])}).shape == (3, 2)
"""
    __init__ = fast_after_init(reference.MMOE.__init__, FastEmbeddingLayer)


class PLE(FastPLEForward, reference.PLE):
    __doc__ = """Progressive Layered Extraction (Tang et al., RecSys 2020) with nextrec 0.3.1's API.

Args:
    shared_expert_params (dict), specific_expert_params (dict | list[dict]): expert MLPs (the
        specific ones per task when a list); every expert of a level outputs the same width.
    num_shared_experts, num_specific_experts (int): experts per CGC level (specific: per task).
    num_levels (int): stacked CGC levels.
    tower_params_list (list[dict]): one tower MLP per task.
""" + _COMMON_ARGS + """
Returns:
    Tensor ``[B, num_tasks]`` (``[B]`` for one task): probabilities (binary tasks).

Example:
    >>> from nextrec_fast.features import SparseFeature
    >>> model = PLE([], [SparseFeature("user", 100, embedding_dim=8)], [], shared_expert_params={"dims": [16]},
    ...             specific_expert_params={"dims": [16]}, num_shared_experts=2, num_specific_experts=1,
    ...             num_levels=2, tower_params_list=[{"dims": [8]}] * 2, target=["click", "buy"]).eval()
    >>> assert model({"user": torch.tensor([1, 2, 3])}).shape == (3, 2)
"""
    __init__ = fast_after_init(reference.PLE.__init__, FastEmbeddingLayer)
