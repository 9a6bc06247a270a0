"""Feature definitions with exactly nextrec 0.6.x's arguments, defaults and derived fields
(``nextrec.basic.features`` of 0.6.14), for the plain-module 0.6 drop-ins without nextrec.

What changed from 0.3.1 (``nextrec_fast.features``): sparse and sequence features share a base
(``EmbeddingFeature``) with ``padding_idx=0``, ``embedding_dim=None`` (the automatic size),
``pretrained_weight`` and ``trainable``; sequences default to ``max_len=50``; dense features
project with ``proj_dim`` / ``use_projection`` / ``projection_type`` ("linear" or "mlp") instead
of ``embedding_dim`` / ``use_embedding``; no per-feature regularisation weights.

With nextrec 0.6 installed, pass nextrec's own features to nextrec's models (its EmbeddingLayer
checks their classes); ours and nextrec's both work in ``nextrec_fast.reference.v06`` and
``nextrec_fast.models.standalone_v06``, which read features by kind (``feature_kind``).
"""
from __future__ import annotations

from typing import Literal

import torch

from nextrec_fast.features import DENSE, SEQUENCE, SPARSE, BaseFeature, feature_kind, get_auto_embedding_dim

# nextrec 0.3.1's feature arguments that 0.6 dropped or renamed: what a 0.3 caller is told.
_LEGACY = {
    "l1_reg": "0.6 has no per-feature regularisation: give the model embedding_l1_reg",
    "l2_reg": "0.6 has no per-feature regularisation: give the model embedding_l2_reg",
    "freeze_pretrained": "0.6 freezes a pretrained table with trainable=False",
    "embedding_dim": "0.6's DenseFeature projects to proj_dim (proj_dim > 1 turns the projection on)",
    "use_embedding": "0.6 calls it use_projection (with proj_dim)",
}


def _refuse_legacy(cls: str, name: str, legacy: dict) -> None:
    if legacy:
        key = next(iter(legacy))
        hint = f": {_LEGACY[key]}" if key in _LEGACY else ""
        raise TypeError(f"{cls} {name!r}: unexpected keyword argument {key!r} (nextrec 0.6's API){hint}")

__all__ = ["EmbeddingFeature", "SparseFeature", "SequenceFeature", "DenseFeature", "feature_kind",
           "get_auto_embedding_dim", "DENSE", "SPARSE", "SEQUENCE"]


class EmbeddingFeature(BaseFeature):
    """What sparse and sequence features share: one table (``embedding_name``, ``vocab_size`` x
    ``embedding_dim``; ``embedding_dim=None``: ``get_auto_embedding_dim(vocab_size)``), its padding
    row, initialiser (``init_type`` "normal" with std 1e-4 by default, see ``get_initializer``),
    and an optional ``pretrained_weight`` (``[vocab_size, embedding_dim]``; frozen when
    ``trainable=False``). 0.3.1's ``l1_reg`` / ``l2_reg`` / ``freeze_pretrained`` raise a TypeError
    saying what 0.6 does instead."""

    def __init__(self, name: str, vocab_size: int, embedding_name: str = "", embedding_dim: int | None = None,
                 padding_idx: int = 0, init_type: str = "normal", init_params: dict | None = None,
                 trainable: bool = True, pretrained_weight: torch.Tensor | None = None, **legacy):
        _refuse_legacy(type(self).__name__, name, legacy)  # 0.3.1's l1_reg / l2_reg / freeze_pretrained
        self.name = name
        self.vocab_size = vocab_size
        self.embedding_name = embedding_name or name
        self.embedding_dim = get_auto_embedding_dim(vocab_size) if embedding_dim is None else embedding_dim
        self.init_type = init_type
        self.init_params = init_params or {}
        self.padding_idx = padding_idx
        self.trainable = trainable
        self.pretrained_weight = pretrained_weight


class SequenceFeature(EmbeddingFeature):
    """A variable-length id sequence ``[B, L]``: the last ``max_len`` ids are looked up and pooled
    by ``combiner`` ("mean", "sum", "concat", "dot_attention", "self_attention"), ``padding_idx``
    masked out."""

    def __init__(self, name: str, vocab_size: int, max_len: int = 50, embedding_name: str = "",
                 embedding_dim: int | None = None, combiner: str = "mean", padding_idx: int = 0,
                 init_type: str = "normal", init_params: dict | None = None, trainable: bool = True,
                 pretrained_weight: torch.Tensor | None = None, **legacy):
        super().__init__(name=name, vocab_size=vocab_size, embedding_name=embedding_name,
                         embedding_dim=embedding_dim, padding_idx=padding_idx, init_type=init_type,
                         init_params=init_params, trainable=trainable, pretrained_weight=pretrained_weight, **legacy)
        self.max_len = max_len
        self.combiner = combiner


class SparseFeature(EmbeddingFeature):
    """One categorical id per row (``[B]``)."""


class DenseFeature(BaseFeature):
    """``input_dim`` float values per row, passed through, or projected to ``proj_dim`` columns by
    a Linear (``projection_type="linear"``) or an MLP (``"mlp"``: ``mlp_hidden_dims`` with
    ``mlp_activation`` and ``mlp_dropout``, then a Linear). ``proj_dim > 1`` turns the projection
    on, as in nextrec; ``embedding_dim`` is the width the feature adds to the model's input.

    Raises:
        TypeError: 0.3.1's ``embedding_dim`` / ``use_embedding`` (the message gives 0.6's names).
        ValueError: ``use_projection=True`` with ``proj_dim=0``; an unknown ``projection_type``;
            ``projection_type="mlp"`` without ``proj_dim``; non-positive ``mlp_hidden_dims``.
    """

    def __init__(self, name: str, input_dim: int = 1, proj_dim: int | None = 0, use_projection: bool = False,
                 projection_type: Literal["linear", "mlp"] = "linear", mlp_hidden_dims: list[int] | None = None,
                 mlp_activation: str = "relu", mlp_dropout: float = 0.0, trainable: bool = True,
                 pretrained_weight: torch.Tensor | None = None, **legacy):
        _refuse_legacy("DenseFeature", name, legacy)  # 0.3.1's embedding_dim / use_embedding
        self.name = name
        self.input_dim = max(int(input_dim), 1)
        self.proj_dim = self.input_dim if proj_dim is None else proj_dim
        if use_projection and self.proj_dim == 0:
            raise ValueError(f"DenseFeature {name!r}: use_projection=True is incompatible with proj_dim=0; "
                             "give proj_dim (the projected width)")
        self.use_projection = True if proj_dim is not None and proj_dim > 1 else use_projection
        self.projection_type = projection_type
        self.mlp_hidden_dims = [int(d) for d in (mlp_hidden_dims or [])]
        self.mlp_activation = mlp_activation
        self.mlp_dropout = float(mlp_dropout)
        if self.projection_type not in {"linear", "mlp"}:
            raise ValueError(f"DenseFeature {name!r}: projection_type must be 'linear' or 'mlp', got {projection_type!r}")
        if self.projection_type == "mlp":
            if self.proj_dim in (None, 0):
                raise ValueError(f"DenseFeature {name!r}: projection_type='mlp' requires proj_dim > 0")
            self.use_projection = True
        if any(d <= 0 for d in self.mlp_hidden_dims):
            raise ValueError(f"DenseFeature {name!r}: mlp_hidden_dims must be positive integers")
        self.embedding_dim = self.input_dim if not self.use_projection else self.proj_dim
        self.trainable = trainable
        self.pretrained_weight = pretrained_weight
