"""Embedding lookup + pooling of all features at once.

Same parameters (and state_dict keys) as nextrec's EmbeddingLayer. The pooling runs through the
``nextrec_fast::pooled_embedding`` op (C++/CUDA) when the extension is available, otherwise
through one ``F.embedding`` / ``F.embedding_bag`` per feature: never a ``[B, L, D]`` tensor
plus a masked bmm as nextrec does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextrec_fast import huge_pages, reference
from nextrec_fast.backend import get_backend
from nextrec_fast.features import DENSE, SEQUENCE, SPARSE, feature_kind
from nextrec_fast.validation import check_batch_inputs


@dataclass(frozen=True)
class PooledSlot:
    """How one sparse/sequence feature is pooled into the output."""
    name: str
    kind: str
    table_name: str
    table_index: int
    combiner: str          # "sum" for single-id sparse features
    mask_id: int           # id left out of sum/mean pooling (-1: none)
    max_len: int           # keep the last max_len ids (-1: all)
    embedding_dim: int
    out_dim: int
    vocab_size: int


def _pooling_backend():
    """The C++/CUDA pooling op module, or None when the extension is unavailable (or the
    ``torch`` backend is forced)."""
    if get_backend() not in ("auto", "triton"):
        return None
    try:
        from nextrec_fast.ops import pooled_embedding as op
    except ImportError:
        return None
    return op if op.is_available() else None


def _as_op_ids(ids: torch.Tensor) -> torch.Tensor:
    # nextrec accepts any integer ids (it calls .long()); the op takes int32 and int64 as they are.
    return ids if ids.dtype in (torch.int32, torch.int64) else ids.long()


class FastEmbeddingMixin:
    """A batched forward for a module with nextrec's EmbeddingLayer attributes (``features``,
    ``embed_dict``, ``dense_transforms``, ``dense_input_dims``): ours, or nextrec's own class in
    ``nextrec_fast.integration``. Call ``_prepare_fast_path()`` once the attributes exist."""

    check_inputs = True  # id-range and shape checks (one aminmax per feature)

    # nextrec's own _project_dense casts dense values with .float(); ours casts to the model's
    # dtype: the same for float32 models, and an accelerated nextrec model also runs in float64.
    _project_dense = reference.EmbeddingLayer._project_dense
    _dense_dtype = reference.EmbeddingLayer._dense_dtype

    def _prepare_fast_path(self):
        """What every fast embedding layer needs once its tables exist: the pooling plan, and
        large CPU tables on huge pages."""
        self._build_plan()
        self.place_tables_on_huge_pages()

    def _build_plan(self):
        table_names = list(self.embed_dict.keys())
        slots, dense = [], []
        for feature in self.features:
            kind = feature_kind(feature)
            if kind == DENSE:
                if not feature.use_embedding and reference._dense_output_dim(feature) != self.dense_input_dims[feature.name]:
                    raise ValueError(
                        f"dense feature {feature.name!r}: use_embedding=False passes its {self.dense_input_dims[feature.name]} "
                        f"input value(s) through, but embedding_dim={feature.embedding_dim} says otherwise; "
                        "set embedding_dim=None (or equal to input_dim) or use_embedding=True")
                dense.append(feature)
                continue
            dim = int(feature.embedding_dim)
            if kind == SPARSE:
                combiner, mask_id, max_len, out_dim = "sum", -1, -1, dim
            else:
                combiner = feature.combiner
                if combiner not in ("sum", "mean", "concat"):
                    raise ValueError(f"Unknown combiner for {feature.name}: {combiner}")
                mask_id = -1 if combiner == "concat" else (feature.padding_idx if feature.padding_idx is not None else 0)
                max_len = -1 if feature.max_len is None else int(feature.max_len)
                out_dim = dim * max_len if combiner == "concat" else dim
            slots.append(PooledSlot(feature.name, kind, feature.embedding_name,
                                    table_names.index(feature.embedding_name), combiner, mask_id, max_len, dim,
                                    out_dim, int(feature.vocab_size)))
        self.slots = tuple(slots)
        self.dense_feature_list = tuple(dense)
        self._check_spec = tuple(
            [(s.name, s.kind, s.vocab_size, 0) for s in slots]
            + [(f.name, DENSE, 0, self.dense_input_dims[f.name]) for f in dense])

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: dict, features: list | None = None, squeeze_dim: bool = True) -> torch.Tensor:
        if get_backend() == "reference" or not squeeze_dim or (features is not None and list(features) != self.features):
            return super().forward(x, features, squeeze_dim)  # layouts the models never ask for
        param = next(self.parameters(), None)
        op = _pooling_backend() if self.slots else None
        if param is not None and not torch.compiler.is_compiling():
            # The pooling op checks id ranges itself (in its kernels, naming the feature): no
            # separate pass over the ids (and, on CUDA, no sync per feature) when it runs.
            check_batch_inputs(x, self._check_spec, param.device, check_ranges=self.check_inputs and op is None)
        pieces = []
        if self.slots:
            pieces.append(self.pool(x, op))
        pieces += [self._project_dense(f, x) for f in self.dense_feature_list]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def tables(self) -> list[torch.Tensor]:
        return [table.weight for table in self.embed_dict.values()]

    def place_tables_on_huge_pages(self) -> int:
        """Moves large CPU tables onto 2 MiB pages (``nextrec_fast.huge_pages``): random row reads
        then rarely miss the TLB. Parameters stay the same objects. Done at construction and by
        ``accelerate()``; call it again after moving a model back to the CPU or changing its dtype.
        Returns how many tables moved."""
        return huge_pages.place_parameters(self.tables())

    def pool(self, x: dict, op=None) -> torch.Tensor:
        """``[B, sum(out_dim)]``: every sparse/sequence feature pooled, in feature order, by the
        pooling op when it is available (``op``: ``_pooling_backend()``, looked up if None), else by PyTorch."""
        op = op if op is not None else _pooling_backend()
        for slot in self.slots:
            if slot.combiner == "concat" and slot.max_len > 0 and x[slot.name].shape[1] < slot.max_len:
                raise ValueError(
                    f"sequence feature {slot.name!r} uses the concat combiner with max_len={slot.max_len}, "
                    f"but its ids have only {x[slot.name].shape[1]} positions; pad them to max_len")
        tables = self.tables()
        if op is not None and tables[0].device.type in ("cpu", "cuda"):
            return op.pooled_embedding(
                tables, [_as_op_ids(x[s.name]) for s in self.slots],
                table_index=[s.table_index for s in self.slots],
                combiners=[s.combiner for s in self.slots],
                mask_ids=[s.mask_id for s in self.slots],
                max_lens=[s.max_len for s in self.slots],
                feature_names=[s.name for s in self.slots],
                grad_padding_idx=[-1 if t.padding_idx is None else int(t.padding_idx) for t in self.embed_dict.values()],
                check_ids=self.check_inputs,
            )
        return torch.cat([self._pool_one_torch(slot, x[slot.name]) for slot in self.slots], dim=1)

    def _pool_one_torch(self, slot: PooledSlot, ids: torch.Tensor) -> torch.Tensor:
        table = self.embed_dict[slot.table_name]
        weight, table_pad = table.weight, table.padding_idx
        ids = ids.long()
        if slot.kind == SPARSE:
            return F.embedding(ids.reshape(-1), weight, padding_idx=table_pad)
        if slot.max_len > 0 and ids.shape[1] > slot.max_len:
            ids = ids[:, -slot.max_len:]
        if slot.combiner == "concat":
            return F.embedding(ids, weight, padding_idx=table_pad).flatten(1)
        if table_pad is not None and table_pad != slot.mask_id:
            # A shared table whose padding row differs from this feature's mask id: embedding_bag
            # cannot block two rows' gradients, so pool the way nextrec does.
            emb = F.embedding(ids, weight, padding_idx=table_pad)
            mask = (ids != slot.mask_id).unsqueeze(1).to(emb.dtype)
            pooled = torch.bmm(mask, emb).squeeze(1)
            return pooled / (mask.sum(-1) + 1e-16) if slot.combiner == "mean" else pooled
        # embedding_bag skips padding_idx entries in the sum, in the mean's count and in the
        # gradient: exactly nextrec's mask (mean: sum / count, and 0 for an all-padding row).
        return F.embedding_bag(ids, weight, mode=slot.combiner, padding_idx=slot.mask_id)


class FastEmbeddingLayer(FastEmbeddingMixin, reference.EmbeddingLayer):
    """nextrec's EmbeddingLayer with a batched forward."""

    def __init__(self, features: list):
        super().__init__(features)
        self._prepare_fast_path()
