"""Feature definitions with exactly nextrec 0.3.1's arguments, defaults and derived fields.

nextrec's own feature objects work everywhere too: the package never checks the class, only
the kind (`feature_kind`), so a nextrec user passes the features they already have.
"""
from __future__ import annotations

import math

__all__ = [
    "SparseFeature",
    "SequenceFeature",
    "DenseFeature",
    "feature_kind",
    "get_auto_embedding_dim",
    "DENSE",
    "SPARSE",
    "SEQUENCE",
]

DENSE, SPARSE, SEQUENCE = "dense", "sparse", "sequence"


def get_auto_embedding_dim(num_classes: int) -> int:
    """nextrec's rule: floor(6 * num_classes ** 0.25) (Deep & Cross Network, ADKDD'17)."""
    return int(math.floor(6 * math.pow(num_classes, 0.25)))


class BaseFeature:
    def __repr__(self):
        params = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return f"{self.__class__.__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


class SequenceFeature(BaseFeature):
    def __init__(
        self,
        name: str,
        vocab_size: int,
        max_len: int = 20,
        embedding_name: str = "",
        embedding_dim: int | None = 4,
        combiner: str = "mean",
        padding_idx: int | None = None,
        init_type: str = "normal",
        init_params: dict | None = None,
        l1_reg: float = 0.0,
        l2_reg: float = 1e-5,
        trainable: bool = True,
    ):
        self.name = name
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.embedding_name = embedding_name or name
        self.embedding_dim = embedding_dim or get_auto_embedding_dim(vocab_size)
        self.init_type = init_type
        self.init_params = init_params or {}
        self.combiner = combiner
        self.padding_idx = padding_idx
        self.l1_reg = l1_reg
        self.l2_reg = l2_reg
        self.trainable = trainable


class SparseFeature(BaseFeature):
    def __init__(
        self,
        name: str,
        vocab_size: int,
        embedding_name: str = "",
        embedding_dim: int | None = 4,
        padding_idx: int | None = None,
        init_type: str = "normal",
        init_params: dict | None = None,
        l1_reg: float = 0.0,
        l2_reg: float = 1e-5,
        trainable: bool = True,
        pretrained_weight=None,
        freeze_pretrained: bool = False,
    ):
        self.name = name
        self.vocab_size = vocab_size
        self.embedding_name = embedding_name or name
        self.embedding_dim = embedding_dim or get_auto_embedding_dim(vocab_size)
        self.init_type = init_type
        self.init_params = init_params or {}
        self.padding_idx = padding_idx
        self.l1_reg = l1_reg
        self.l2_reg = l2_reg
        self.trainable = trainable
        self.pretrained_weight = pretrained_weight
        self.freeze_pretrained = freeze_pretrained


class DenseFeature(BaseFeature):
    def __init__(
        self,
        name: str,
        embedding_dim: int | None = 1,
        input_dim: int = 1,
        use_embedding: bool = False,
    ):
        self.name = name
        self.input_dim = max(int(input_dim or 1), 1)
        self.embedding_dim = embedding_dim or self.input_dim
        if embedding_dim is not None and embedding_dim > 1:
            self.use_embedding = True
        else:
            self.use_embedding = use_embedding  # nextrec: the user decides for dim <= 1


def feature_kind(feature) -> str:
    """'dense', 'sparse' or 'sequence' for our features and nextrec's (duck typing)."""
    name = type(feature).__name__
    if name == "SequenceFeature":
        return SEQUENCE
    if name == "SparseFeature":
        return SPARSE
    if name == "DenseFeature":
        return DENSE
    if hasattr(feature, "vocab_size"):
        return SEQUENCE if hasattr(feature, "combiner") and hasattr(feature, "max_len") else SPARSE
    if hasattr(feature, "input_dim") or hasattr(feature, "use_embedding"):
        return DENSE
    raise TypeError(
        f"Unsupported feature type {type(feature).__name__!r} for feature "
        f"{getattr(feature, 'name', '?')!r}: expected a SparseFeature, SequenceFeature or DenseFeature "
        "(from nextrec_fast.features or nextrec.basic.features)"
    )
