"""Embedding lookup + pooling of all features at once.

Same parameters (and state_dict keys) as nextrec's EmbeddingLayer. The pooling runs through the
``nextrec_fast::pooled_embedding`` op (C++/CUDA) when the extension is available, otherwise
through one ``F.embedding`` / ``F.embedding_bag`` per feature: never a ``[B, L, D]`` tensor
plus a masked bmm as nextrec does. Combiners the op does not compute (nextrec 0.6's attention
poolings, which have parameters) are pooled by the layer's own module for that feature, while
every other feature still goes through the one call. Which features, tables, combiners and
projections a layer has comes from ``nextrec_fast.compat`` (``embedding_plan``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nextrec_fast import compat, huge_pages
from nextrec_fast.backend import get_backend
from nextrec_fast.compat import DenseFeatureSpec, PooledFeatureSpec
from nextrec_fast.features import DENSE, SPARSE
from nextrec_fast.layers.hooks import needs_module_call
from nextrec_fast.validation import check_batch_inputs


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
    ``embed_dict``, ``dense_transforms``, ...): ours, or nextrec's own class in
    ``nextrec_fast.integration``. ``_compat`` (a class attribute) is the nextrec generation whose
    layout the layer has. Call ``_prepare_fast_path()`` once the attributes exist."""

    check_inputs = True  # id-range and shape checks (one aminmax per feature)
    _compat: compat.NextrecGeneration = compat.V03
    # Instance attributes the plan adds (dropped again by restore() and when pickling as nextrec's class).
    FAST_STATE = ("slots", "_slot_tables", "_op_slots", "_op_args", "dense_specs", "_check_spec")

    def _prepare_fast_path(self):
        """What every fast embedding layer needs once its tables exist: the pooling plan, and
        large CPU tables on huge pages."""
        self._build_plan()
        self.place_tables_on_huge_pages()

    def _build_plan(self):
        self._set_plan(*self._compat.embedding_plan(self))

    def _set_plan(self, pooled: list[PooledFeatureSpec], dense: list[DenseFeatureSpec]) -> None:
        """The plan for these features (``pooled`` read tables of ``self.embed_dict`` by name)."""
        table_names = list(self.embed_dict.keys())
        self.slots: tuple[PooledFeatureSpec, ...] = tuple(pooled)
        self._slot_tables = tuple(table_names.index(s.table_name) for s in pooled)
        self._op_slots = tuple(i for i, s in enumerate(pooled) if s.pooling_module is None)
        op_slots = [pooled[i] for i in self._op_slots]
        self._op_args = dict(  # the pooling op's per-feature arguments, fixed with the plan
            table_index=[self._slot_tables[i] for i in self._op_slots], combiners=[s.combiner for s in op_slots],
            mask_ids=[s.mask_id for s in op_slots], max_lens=[s.max_len for s in op_slots],
            feature_names=[s.name for s in op_slots],
            grad_padding_idx=[-1 if t.padding_idx is None else int(t.padding_idx) for t in self.embed_dict.values()])
        self.dense_specs: tuple[DenseFeatureSpec, ...] = tuple(dense)
        self._check_spec = tuple(
            [(s.name, s.kind, s.vocab_size, 0) for s in pooled] + [(d.name, DENSE, 0, d.input_dim) for d in dense])

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: dict, features: list | None = None, squeeze_dim: bool | None = None, **kwargs) -> torch.Tensor:
        """``[B, sum of output dims]``: pooled features in feature order, then dense ones (nextrec's
        ``squeeze_dim=True`` layout, which the multi-task models ask for). Other layouts
        (``squeeze_dim=False``, ``sequence_output="raw"``, a subset of features) run nextrec's own
        forward, as do the ``reference`` backend, ONNX export, and a layer whose tables or
        projections have hooks or parametrised weights (the op reads tables without calling them)."""
        squeeze = self._compat.squeeze_dim_default if squeeze_dim is None else squeeze_dim
        own_forward = self._own_forward_reason(features, squeeze, kwargs.get("sequence_output", "pooled"))
        if own_forward is not None:
            if self.table_output_dtype is not None:
                raise NotImplementedError(
                    f"{own_forward}: this call takes nextrec's own embedding forward, which does not handle "
                    f"{self.tables()[0].dtype} tables; call embedding.cast_tables({self.table_output_dtype}) first")
            return super().forward(x, self.features if features is None else features, squeeze, **kwargs)
        param = self._first_parameter()
        op = _pooling_backend() if self._op_slots else None
        if param is not None and not torch.compiler.is_compiling():
            # The pooling op checks id ranges itself (in its kernels, naming the feature): no
            # separate pass over the ids (and, on CUDA, no sync per feature) when it runs.
            check_batch_inputs(x, self._check_spec, param.device, check_ranges=self.check_inputs and op is None)
        pieces = []
        if self.slots:
            pooled = self.pool(x, op)
            if self.table_output_dtype is not None:  # 16-bit tables: the layer still gives the model's dtype
                pooled = pooled.to(self.table_output_dtype)
            pieces.append(pooled)
        if self.dense_specs:
            # The dtype dense inputs take: the model's (16-bit tables leave the output in it).
            model_dtype = self.table_output_dtype or (param.dtype if param is not None else None)
            pieces += [self._dense_column(spec, x, model_dtype) for spec in self.dense_specs]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _own_forward_reason(self, features, squeeze: bool, sequence_output) -> str | None:
        """Why a call must run nextrec's own forward (see ``forward``), or None for the fast path."""
        if get_backend() == "reference":
            return "the reference backend is active"
        if not squeeze:
            return "squeeze_dim=False"
        if sequence_output != "pooled":
            return f"sequence_output={sequence_output!r}"
        if torch.onnx.is_in_onnx_export():
            return "ONNX export"
        if features is not None and list(features) != self.features:
            return "a subset of the features"
        if needs_module_call(self.children()):
            return "a hook or parametrisation on a table or projection"
        return None

    def _first_parameter(self) -> torch.Tensor | None:
        """The first table's weight (else ``next(self.parameters())``): for the device and dtype
        checks of every call, without ``parameters()``' walk over the submodules (once per dense
        feature and call, it was about 2% of a batch-64 forward)."""
        for table in self.embed_dict.values():
            return table.weight
        return next(self.parameters(), None)

    def _dense_column(self, spec: DenseFeatureSpec, x: dict, model_dtype: torch.dtype | None) -> torch.Tensor:
        if spec.name not in x:
            raise KeyError(f"Dense feature '{spec.name}' is missing from input.")
        value = self._compat.dense_value(x[spec.name], model_dtype)
        value = value.unsqueeze(-1) if value.dim() == 1 else value.view(value.size(0), -1)
        if value.shape[1] != spec.input_dim:
            raise ValueError(f"Dense feature '{spec.name}' expects {spec.input_dim} inputs but got {value.shape[1]}.")
        return value if spec.projection is None else spec.projection(value)

    def tables(self) -> list[torch.Tensor]:
        return [table.weight for table in self.embed_dict.values()]

    # The dtype the layer gives while its tables are stored in 16 bits (cast_tables), else None.
    table_output_dtype: torch.dtype | None = None

    def cast_tables(self, dtype: torch.dtype) -> None:
        """Stores every embedding table in ``dtype``, in place.

        ``torch.bfloat16`` or ``torch.float16``: half the bytes of float32, so half the tables'
        memory and half the bytes an optimiser's pass over them moves (FBGEMM's fp16
        ``weights_precision``). The pooling reads no fewer cache lines for rows of up to 16
        values (64 bytes in float32). The pooling op reads the 16-bit rows and sums them in float32; the pooled ``[B, D]`` values
        are rounded to ``dtype`` (the op's output dtype is its tables'), then the layer returns
        them in the dtype the tables had before (float32), so the rest of the model, its
        parameters and its optimiser are unchanged. What this costs in accuracy is measured in
        docs/models.md ("16-bit tables"). The model's own dtype (float32) casts back (the values
        stay rounded).

        The table Parameters stay the same objects (optimisers and ``apply_optimizer_in_backward``
        keep them); their gradients come in ``dtype``. Cast before an optimiser's first step (with
        nextrec: after ``accelerate``, before the first ``fit``): its state is created in the
        dtype of the parameter it first sees, and a later cast makes torch's Adam fail ("expected
        scalar type BFloat16 but found Float"). Tables on 2 MiB pages are placed there again.
        ``nextrec_fast.restore`` casts 16-bit tables back; ``load_state_dict`` keeps the receiving
        model's table dtype.

        Raises:
            TypeError: ``dtype`` is neither 16-bit nor the model's dtype.
            NotImplementedError: a feature is pooled by a module of its own (nextrec 0.6's
                attention poolings), which would get 16-bit rows; and, once cast, any call that
                takes nextrec's own embedding forward (see ``forward``).
        """
        tables = self.tables()
        if not tables:
            return
        output = self.table_output_dtype or tables[0].dtype  # the model's dtype
        sixteen_bit = dtype in (torch.bfloat16, torch.float16)
        if not sixteen_bit and dtype != output:
            raise TypeError(
                f"cast_tables: dtype must be torch.bfloat16 or torch.float16, or {output} (the model's dtype) to "
                f"cast back; got {dtype}. To change the whole model's dtype, use model.to({dtype}) instead")
        if sixteen_bit:
            own = [s.name for s in self.slots if s.pooling_module is not None]
            if own:
                raise NotImplementedError(
                    f"cast_tables: feature(s) {', '.join(own)} are pooled by a module of their own (attention "
                    f"pooling), which needs tables in the model's dtype; keep float32 tables for this model")
        for table in tables:
            if table.dtype != dtype:
                table.data = table.data.to(dtype)
                table.grad = None  # a gradient of the old dtype could not be accumulated into
        if sixteen_bit:
            self.table_output_dtype = output
        else:
            self.__dict__.pop("table_output_dtype", None)
        self.place_tables_on_huge_pages()

    def place_tables_on_huge_pages(self) -> int:
        """Moves large CPU tables onto 2 MiB pages (``nextrec_fast.huge_pages``): random row reads
        then rarely miss the TLB. Parameters stay the same objects. Done at construction and by
        ``accelerate()``; call it again after moving a model back to the CPU or changing its dtype.
        Returns how many tables moved."""
        return huge_pages.place_parameters(self.tables())

    def pool(self, x: dict, op=None) -> torch.Tensor:
        """``[B, sum(out_dim)]``: every sparse/sequence feature pooled, in feature order, by the
        pooling op when it is available (``op``: ``_pooling_backend()``, looked up if None), else by
        PyTorch; features with a pooling module of their own by that module."""
        op = op if op is not None else _pooling_backend()
        slots = self.slots
        for slot in slots:
            if slot.combiner == "concat" and slot.max_len > 0 and x[slot.name].shape[1] < slot.max_len:
                raise ValueError(
                    f"sequence feature {slot.name!r} uses the concat combiner with max_len={slot.max_len}, "
                    f"but its ids have only {x[slot.name].shape[1]} positions; pad them to max_len")
        op_slots = [slots[i] for i in self._op_slots]
        pooled = None
        if op_slots:
            tables = self.tables()
            if op is not None and tables[0].device.type in ("cpu", "cuda"):
                pooled = op.pooled_embedding(tables, [_as_op_ids(x[s.name]) for s in op_slots],
                                             check_ids=self.check_inputs, **self._op_args)
            else:
                pooled = torch.cat([self._pool_one_torch(slot, x[slot.name]) for slot in op_slots], dim=1)
        if len(op_slots) == len(slots):
            return pooled
        pieces, column = [], 0  # module-pooled features between the op's columns, in feature order
        for slot in slots:
            if slot.pooling_module is None:
                pieces.append(pooled[:, column:column + slot.out_dim])
                column += slot.out_dim
            else:
                pieces.append(self._pool_by_module(slot, x[slot.name]))
        return torch.cat(pieces, dim=1)

    def _pool_by_module(self, slot: PooledFeatureSpec, ids: torch.Tensor) -> torch.Tensor:
        """nextrec's own path for one sequence feature: look up ``[B, L, D]``, mask padding ids
        (``[B, 1, L]``, 1 for valid), pool with the feature's module."""
        ids = ids.long()
        if slot.max_len > 0:
            ids = ids[:, -slot.max_len:]
        emb = self.embed_dict[slot.table_name](ids)
        mask = (ids != slot.mask_id).unsqueeze(1).to(emb.dtype)
        return slot.pooling_module(emb, mask)

    def _pool_one_torch(self, slot: PooledFeatureSpec, ids: torch.Tensor) -> torch.Tensor:
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
