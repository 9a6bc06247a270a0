"""One-call multi-feature embedding pooling (nextrec 0.3.1 EmbeddingLayer semantics).

The kernels are C++/CUDA ops registered in ``csrc/`` as ``torch.ops.nextrec_fast.pooled_embedding_*``;
this module adds their fake (meta) implementations and the autograd formula through
``torch.library``, and the public wrapper :func:`pooled_embedding`.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from nextrec_fast import _extension, huge_pages
from nextrec_fast.ops._dispatch import call_op, create_graph_requested, grads_with_graph

__all__ = ["pooled_embedding", "is_available", "unavailable_reason", "COMBINERS"]

COMBINERS = {"sum": 0, "mean": 1, "concat": 2}
_SUM, _MEAN, _CONCAT = 0, 1, 2


def is_available() -> bool:
    return _OPS_REGISTERED


def unavailable_reason() -> str:
    return _extension.unavailable_reason()


def pooled_embedding(
    tables: list[Tensor],
    ids: list[Tensor],
    *,
    table_index: list[int],
    combiners: list[str],
    mask_ids: list[int],
    max_lens: list[int],
    feature_names: list[str],
    offsets: list[Tensor | None] | None = None,
    per_id_weights: list[Tensor | None] | None = None,
    grad_padding_idx: list[int] | None = None,
    check_ids: bool = True,
    deterministic: bool | None = None,
    sparse_grad: bool = False,
) -> Tensor:
    """Pools every feature and returns ``[B, total_dim]``: the features' outputs in the given order.

    Per feature ``f`` reading ``tables[table_index[f]]`` (``[V, D]``):

    - ``"sum"``: sum over the kept positions whose id != ``mask_ids[f]`` of the rows (times the
      per-id weight if given), accumulated in fp32; ``"mean"``: that sum / (count + 1e-16), where
      count is the number of such positions (so an all-padding bag gives zeros; with weights the
      weighted sum is divided by the same count); ``"concat"``: the kept rows flattened, no
      masking, ``[B, max_len * D]`` (padded layout only).
    - Padded ids are ``[B]``/``[B, 1]`` (one id) or ``[B, L]``; jagged ids are 1-D values with
      ``offsets[f]`` = ``[B + 1]`` (starting at 0, ending at ``len(values)``). A bag keeps its
      last ``max_lens[f]`` positions (-1: all), like nextrec's ``seq[:, -max_len:]``.
    - Backward gives each table a dense gradient (shared tables: one summed gradient); the row
      ``grad_padding_idx[t]`` gets none. ``sparse_grad=True`` gives uncoalesced sparse COO
      gradients instead, like ``nn.Embedding(sparse=True)``.
    - ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()`` (the CPU
      backward is always deterministic; on CUDA, fp16/bf16 tables always take the deterministic
      path, which accumulates in fp32, since atomics would round after every addition).
    - ``check_ids=False`` skips the id-range report on CUDA (one device sync); ids are always
      checked on the CPU, and never read out of bounds.
    """
    if not _OPS_REGISTERED:
        raise RuntimeError(f"nextrec_fast pooled_embedding is unavailable: {unavailable_reason()}")
    num_features = len(ids)
    offsets = [None] * num_features if offsets is None else list(offsets)
    per_id_weights = [None] * num_features if per_id_weights is None else list(per_id_weights)
    grad_padding_idx = [-1] * len(tables) if grad_padding_idx is None else [int(p) for p in grad_padding_idx]
    for what, values in (("table_index", table_index), ("combiners", combiners), ("mask_ids", mask_ids),
                         ("max_lens", max_lens), ("feature_names", feature_names), ("offsets", offsets),
                         ("per_id_weights", per_id_weights)):
        if len(values) != num_features:
            raise ValueError(f"pooled_embedding: {what} has {len(values)} entries but there are "
                             f"{num_features} features (ids)")
    try:
        codes = [COMBINERS[c] for c in combiners]
    except (KeyError, TypeError):
        for name, combiner in zip(feature_names, combiners):
            if COMBINERS.get(combiner) is None:
                raise ValueError(f"pooled_embedding: feature '{name}': unknown combiner {combiner!r} "
                                 f"(expected one of {sorted(COMBINERS)})") from None
        raise
    # Devices and dtypes are checked by the kernels (CPU, CUDA) and by the fake implementation
    # (meta, fake tensors), whichever the dispatcher picks for a mix of devices.
    if sparse_grad and tables and tables[0].device.type != "cpu":
        raise NotImplementedError("pooled_embedding: sparse_grad=True is implemented on the CPU only; "
                                  "use the dense gradient on CUDA")
    # Weights travel as a list of tensors plus their feature indices: torch.library only
    # differentiates lists whose items are all tensors.
    weighted_features = [f for f, w in enumerate(per_id_weights) if w is not None]
    weights = [per_id_weights[f] for f in weighted_features]
    if tables:
        weights = [w if w.dtype == tables[0].dtype else w.to(tables[0].dtype) for w in weights]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (list(tables), list(ids), offsets, weights, weighted_features, [int(t) for t in table_index], codes,
            [int(m) for m in mask_ids], [int(m) for m in max_lens], list(feature_names), grad_padding_idx,
            bool(check_ids), bool(deterministic), bool(sparse_grad))
    # Below the Autograd key when nothing needs a gradient (ops._dispatch).
    return call_op(torch.ops.nextrec_fast.pooled_embedding_forward, args, [*tables, *weights])


# ---------------------------------------------------------------------------------------------
# Shapes (fake / meta implementations): the same rules as make_plan() in csrc/pooled_embedding.cpp
# ---------------------------------------------------------------------------------------------

def _check_devices_and_dtypes(tables, ids, offsets, weights, feature_names):
    """The fake implementation's device/dtype checks: a mix of devices that includes meta or
    fake tensors is dispatched here and never reaches the C++ checks."""
    if not tables:
        return
    device, dtype = tables[0].device, tables[0].dtype
    for t, table in enumerate(tables):
        if table.device != device:
            raise ValueError(f"pooled_embedding: all tables must be on one device; table {t} is on "
                             f"{table.device}, table 0 on {device}")
        if table.dtype != dtype:
            raise TypeError(f"pooled_embedding: all tables must have one dtype; table {t} is {table.dtype}, "
                            f"table 0 is {dtype}")
    for f, name in enumerate(feature_names):
        for what, tensor in (("ids", ids[f]), ("offsets", offsets[f]), ("per_id_weights", weights[f])):
            if tensor is not None and tensor.device != device:
                raise ValueError(f"pooled_embedding: feature '{name}': {what} are on {tensor.device} but the "
                                 f"tables are on {device}")


def _output_shape(tables, ids, offsets, table_index, combiners, max_lens, feature_names):
    batch = None
    total = 0
    for f, feature_ids in enumerate(ids):
        name = feature_names[f]
        if feature_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"pooled_embedding: feature '{name}': ids must be int32 or int64, got {feature_ids.dtype}")
        if not 0 <= table_index[f] < len(tables):
            raise ValueError(f"pooled_embedding: feature '{name}': table_index {table_index[f]} is out of range")
        dim = tables[table_index[f]].shape[1]
        if max_lens[f] < 1 and max_lens[f] != -1:
            raise ValueError(f"pooled_embedding: feature '{name}': max_len must be >= 1 or -1 (keep all), "
                             f"got {max_lens[f]}")
        if offsets[f] is not None:
            if combiners[f] == _CONCAT:
                raise ValueError(f"pooled_embedding: feature '{name}': the concat combiner needs the padded layout")
            if feature_ids.dim() != 1 or offsets[f].dim() != 1:
                raise ValueError(f"pooled_embedding: feature '{name}': jagged ids and offsets must be 1-D")
            rows = offsets[f].shape[0] - 1
            width = dim
        else:
            if feature_ids.dim() not in (1, 2):
                raise ValueError(f"pooled_embedding: feature '{name}': padded ids must be [B], [B, 1] or [B, L], "
                                 f"got shape {tuple(feature_ids.shape)}")
            rows = feature_ids.shape[0]
            seq_len = feature_ids.shape[1] if feature_ids.dim() == 2 else 1
            if combiners[f] == _CONCAT:
                if max_lens[f] >= 0 and seq_len < max_lens[f]:
                    raise ValueError(f"pooled_embedding: feature '{name}': concat needs at least "
                                     f"max_len={max_lens[f]} positions per row but ids have {seq_len}")
                width = (min(seq_len, max_lens[f]) if max_lens[f] >= 0 else seq_len) * dim
            else:
                width = dim
        if batch is None:
            batch = rows
        elif rows != batch:
            raise ValueError(f"pooled_embedding: feature '{name}' has batch size {rows} but "
                             f"feature '{feature_names[0]}' has {batch}")
        total += width
    return batch, total


def _register_fakes():
    @torch.library.register_fake("nextrec_fast::pooled_embedding_forward")
    def _forward_fake(tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners, mask_ids, max_lens,
                      feature_names, grad_padding_idx, check_ids, deterministic, sparse_grad):
        weights = [None] * len(ids)
        for f, w in zip(weighted_features, per_id_weights):
            weights[f] = w
        _check_devices_and_dtypes(tables, ids, offsets, weights, feature_names)
        batch, total = _output_shape(tables, ids, offsets, table_index, combiners, max_lens, feature_names)
        return tables[0].new_empty((batch, total))

    @torch.library.register_fake("nextrec_fast::pooled_embedding_backward")
    def _backward_fake(grad_out, tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners, mask_ids,
                       max_lens, feature_names, grad_padding_idx, table_needs_grad, deterministic):
        return [t.new_empty(t.shape) for t, need in zip(tables, table_needs_grad) if need]

    @torch.library.register_fake("nextrec_fast::pooled_embedding_backward_into_dirty")
    def _backward_into_dirty_fake(grad_out, grads, tables, ids, offsets, per_id_weights, weighted_features,
                                  table_index, combiners, mask_ids, max_lens, feature_names, grad_padding_idx,
                                  table_needs_grad, deterministic, dirty_rows):
        return None

    @torch.library.register_fake("nextrec_fast::pooled_embedding_backward_into")
    def _backward_into_fake(grad_out, grads, tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners,
                            mask_ids, max_lens, feature_names, grad_padding_idx, table_needs_grad, deterministic):
        return None

    @torch.library.register_fake("nextrec_fast::pooled_embedding_weight_backward")
    def _weight_backward_fake(grad_out, tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners, mask_ids,
                              max_lens, feature_names):
        return [w.new_empty(w.shape) for w in per_id_weights]

    @torch.library.register_fake("nextrec_fast::pooled_embedding_backward_sparse")
    def _backward_sparse_fake(grad_out, tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners, mask_ids,
                              max_lens, feature_names, grad_padding_idx, table_needs_grad):
        ctx = torch.library.get_ctx()
        out = []
        for t, need in zip(tables, table_needs_grad):
            if need:
                n = ctx.new_dynamic_size()
                out += [t.new_empty((n,), dtype=torch.int64), t.new_empty((n, t.shape[1]))]
        return out


# ---------------------------------------------------------------------------------------------
# Gradient buffer reuse
# ---------------------------------------------------------------------------------------------
#
# Dense table gradients are as large as the tables, and a fresh V x D buffer per step costs page
# faults (on CPU a fresh 256 MiB torch.zeros is ~5x slower than re-zeroing an existing one). So
# per table we keep an *alias* (a second TensorImpl on the same storage, made with detach(),
# which unlike view() holds no reference to the returned tensor) of the last buffer we returned.
# AccumulateGrad "steals" a returned gradient whose TensorImpl nobody else references, so
# param.grad ends up sharing that storage. On the next backward, if the storage is referenced by
# our alias alone (the user ran zero_grad(set_to_none=True), or autograd only added our buffer
# into an existing .grad and dropped it), nobody can observe it any more: we re-zero and return
# it again. Otherwise (.grad kept, gradient accumulation, retain_graph, hooks holding it) we
# allocate a fresh buffer, exactly as nn.Embedding would. Entries are keyed weakly on the table,
# so the cache never keeps a model alive. A graph traced by torch.compile calls the opaque
# pooled_embedding_backward_reusing op, which makes the same decision when it runs; other
# tracers and NEXTREC_FAST_GRAD_REUSE=0 get fresh buffers.

def _storage_refs(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


# References a storage has when a single tensor uses it (the measurement itself adds a
# temporary Python storage object; measured rather than assumed).
_SOLE_OWNER_REFS = _storage_refs(torch.empty(1))


class _GradBufferCache:
    # Fresh buffers per table that may go on huge pages: faulting them in is slower than small
    # pages, so it pays only for buffers that are then reused. Steady states need one buffer
    # (zero_grad(set_to_none=True)) or two (.grad kept and accumulated into); a table that keeps
    # missing gets ordinary buffers.
    HUGE_PAGE_ALLOCATIONS = 2

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[weakref.ref, Tensor, int]] = {}
        # key -> (buffer version after our write, int64 rows that write may have made non-zero)
        self._written: dict[int, tuple[int, Tensor]] = {}

    def acquire(self, table: Tensor) -> tuple[Tensor, Tensor | None]:
        """A contiguous buffer shaped like ``table`` that nobody else can observe, and the rows
        outside which it holds zeros (None: its contents are undefined).

        A reused buffer's rows are known when nothing has written it since our last write: its
        version counter (bumped by every in-place op, the guard autograd itself uses for saved
        tensors) is the one recorded after that write, and the rows are that write's ids; the
        kernel then zeroes just those. Anything else (an optimiser or clipping that scaled it in
        place, DDP's all-reduce copying into it) leaves the whole buffer to be zeroed."""
        key = id(table)
        with self._lock:
            entry = self._entries.get(key)
            written = self._written.pop(key, None)
            allocations = 0
            if entry is not None:
                ref, alias, allocations = entry
                if ref() is not table:
                    allocations = 0
                elif (alias.shape == table.shape and alias.dtype == table.dtype and alias.device == table.device
                        and _storage_refs(alias) == _SOLE_OWNER_REFS):
                    dirty = written[1] if written is not None and written[0] == alias._version else None
                    return alias.detach(), dirty
            # The backward's scatter reads and writes rows of the buffer at random, like the
            # forward reads the table: on CPU it goes on huge pages too.
            if table.device.type == "cpu" and allocations < self.HUGE_PAGE_ALLOCATIONS:
                buffer = huge_pages.empty(table.shape, table.dtype)
            else:
                buffer = torch.empty(table.shape, dtype=table.dtype, device=table.device)

            def _forget(dead_ref, key=key, entries=self._entries, written=self._written):
                current = entries.get(key)
                if current is not None and current[0] is dead_ref:
                    del entries[key]
                    written.pop(key, None)  # the dead table's rows

            self._entries[key] = (weakref.ref(table, _forget), buffer.detach(), allocations + 1)
            return buffer, None

    def written(self, table: Tensor, buffer: Tensor, rows: Tensor) -> None:
        """Record that ``buffer`` (acquired for ``table``) now has non-zeros in ``rows`` only."""
        key = id(table)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is table and entry[1].data_ptr() == buffer.data_ptr():
                self._written[key] = (buffer._version, rows)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._written.clear()


_grad_buffers = _GradBufferCache()


def _grad_reuse_allowed() -> bool:
    return os.environ.get("NEXTREC_FAST_GRAD_REUSE", "1") != "0"


def _grad_reuse_enabled(sample: Tensor) -> bool:
    if not _grad_reuse_allowed():
        return False
    # Under torch.compile / make_fx the tensors are fake or functional wrappers, or a dispatch
    # mode traces the ops: no reuse.
    if torch.compiler.is_compiling() or type(sample) is not torch.Tensor:
        return False
    return torch._C._len_torch_dispatch_stack() == 0 and not torch._is_functional_tensor(sample)


@torch.library.custom_op(  # the schema of pooled_embedding_backward (csrc/pooled_embedding.cpp)
    "nextrec_fast::pooled_embedding_backward_reusing", mutates_args=(),
    schema="(Tensor grad_out, Tensor[] tables, Tensor[] ids, Tensor?[] offsets, Tensor[] per_id_weights, "
           "int[] weighted_features, int[] table_index, int[] combiners, int[] mask_ids, int[] max_lens, "
           "str[] feature_names, int[] grad_padding_idx, int[] table_needs_grad, bool deterministic) -> Tensor[]")
def _backward_reusing(grad_out, tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners,
                      mask_ids, max_lens, feature_names, grad_padding_idx, table_needs_grad, deterministic):
    """``pooled_embedding_backward`` into the reused gradient buffers when nobody else can see
    them (decided when it runs, with real tensors): what the eager backward does, for graphs
    that torch.compile traced. The buffers are keyed on the table tensors it is given."""
    args = (grad_out, tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners, mask_ids,
            max_lens, feature_names, grad_padding_idx, table_needs_grad, deterministic)
    if not _grad_reuse_enabled(grad_out):
        return list(torch.ops.nextrec_fast.pooled_embedding_backward(*args))
    # Rows are not tracked here: a compiled graph's own kernels may write buffers without bumping
    # their version counters, so each is zeroed whole.
    return _backward_into_reused_buffers(tables, *args, track_rows=False)


def _backward_into_reused_buffers(keys, grad_out, tables, *args, track_rows: bool = True) -> list[Tensor]:
    """``pooled_embedding_backward`` (same arguments after ``keys``) written into the cached
    gradient buffers of the tables that need one, the buffer of table t keyed on ``keys[t]``
    (its owning parameter)."""
    table_needs_grad = args[-2]
    acquired = [(t, _grad_buffers.acquire(key)) for t, (key, need) in enumerate(zip(keys, table_needs_grad)) if need]
    buffers = [buffer for _, (buffer, _) in acquired]
    dirty = [rows if track_rows else None for _, (_, rows) in acquired]
    torch.ops.nextrec_fast.pooled_embedding_backward_into_dirty(grad_out, buffers, tables, *args, dirty)
    if not track_rows:
        return buffers
    # The rows this write may have made non-zero: every id of the features reading the table (a
    # superset: truncated or masked ids are included, and zeroing a zero row is harmless).
    ids, table_index = args[0], args[4]
    for t, (buffer, _) in acquired:
        rows = [i.reshape(-1).long() for i, ti in zip(ids, table_index) if ti == t]
        rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long, device=buffer.device)  # cat copies
        _grad_buffers.written(keys[t], buffer, rows)
    return buffers


@_backward_reusing.register_fake
def _backward_reusing_fake(grad_out, tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners,
                           mask_ids, max_lens, feature_names, grad_padding_idx, table_needs_grad, deterministic):
    return [t.new_empty(t.shape) for t, need in zip(tables, table_needs_grad) if need]


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    (tables, ids, offsets, per_id_weights, weighted_features, table_index, combiners, mask_ids, max_lens,
     feature_names, grad_padding_idx, check_ids, deterministic, sparse_grad) = inputs
    # The gradient structure must mirror the inputs: lists whose items are all tensors (empty
    # lists included) get per-item gradients, any other argument a single None.
    ctx.grad_structure = [len(a) if isinstance(a, (list, tuple)) and all(isinstance(x, Tensor) for x in a) else None
                          for a in inputs]
    ctx.num_tables = len(tables)
    ctx.num_features = len(ids)
    ctx.num_weights = len(per_id_weights)
    ctx.offset_slots = [o is not None for o in offsets]
    ctx.weighted_features = list(weighted_features)
    ctx.table_refs = [weakref.ref(t) for t in tables]
    ctx.static = (list(table_index), list(combiners), list(mask_ids), list(max_lens), list(feature_names))
    ctx.grad_padding_idx = list(grad_padding_idx)
    ctx.deterministic = deterministic
    ctx.sparse_grad = sparse_grad
    ctx.save_for_backward(*tables, *ids, *[o for o in offsets if o is not None], *per_id_weights)


def _unpack(ctx):
    saved = list(ctx.saved_tensors)
    tables = saved[:ctx.num_tables]
    ids = saved[ctx.num_tables:ctx.num_tables + ctx.num_features]
    rest = iter(saved[ctx.num_tables + ctx.num_features:])
    offsets = [next(rest) if present else None for present in ctx.offset_slots]
    return tables, ids, offsets, list(rest)


def _per_item(needs, count):
    """needs_input_grad of a list argument: a list of flags, or one flag (e.g. a list of Nones)."""
    if isinstance(needs, (list, tuple)):
        return [bool(n) for n in needs] + [False] * (count - len(needs))
    return [bool(needs)] * count


# The attribute a table under an in-backward optimiser carries (set by nextrec_fast.optim): an
# object whose ``optimizer`` has ``apply(table, rows, summed_gradient_rows)``.
IN_BACKWARD_ATTR = "_nextrec_fast_in_backward"


def _in_backward_optimizers(ctx, table_needs) -> list:
    """Per table, the optimiser applied inside this backward (nextrec_fast.optim), or None."""
    optimizers = []
    for ref, need in zip(ctx.table_refs, table_needs):
        owner = ref() if need else None
        entry = getattr(owner, IN_BACKWARD_ATTR, None) if owner is not None else None
        optimizers.append(entry.optimizer if entry is not None else None)
    return optimizers


def _in_backward_updates(ctx, optimizers, grad_out, tables, ids, offsets, weights) -> list:
    """The updates of the tables under an in-backward optimiser, ``[(optimizer, table, rows,
    summed gradient rows)]``: their sparse gradient rows summed per distinct row and checked
    finite (all before any table changes)."""
    table_index, combiners, mask_ids, max_lens, names = ctx.static
    if torch.compiler.is_compiling():
        raise NotImplementedError("apply_optimizer_in_backward: not supported under torch.compile (the update is a "
                                  "side effect of the backward); compile the dense part only")
    mask = [int(o is not None) for o in optimizers]
    # Distinct rows (first-appearance order) and their gradients summed in position order, in
    # C++, without writing the [N, D] entries: torch.unique + index_add_ over backward_sparse's
    # entries took about 20 of the 38 ms an SGD step on the default tables took (B=2048, 1 thread).
    flat = torch.ops.nextrec_fast.pooled_embedding_backward_coalesced(
        grad_out, tables, ids, offsets, weights, ctx.weighted_features, table_index, combiners, mask_ids, max_lens,
        names, ctx.grad_padding_idx, mask)
    *flat, finite = flat
    pairs = iter(zip(flat[0::2], flat[1::2]))
    wanted = [t for t, optimizer in enumerate(optimizers) if optimizer is not None]
    if not bool(finite.all()):  # checked in C++ (one pass over each table's summed rows)
        t = wanted[int((~finite).nonzero()[0])]
        readers = [n for n, ti in zip(names, table_index) if ti == t]
        raise FloatingPointError(f"apply_optimizer_in_backward: a non-finite gradient reached the table of feature(s) "
                                 f"{', '.join(map(repr, readers))}; no table was updated in this step")
    return [(optimizers[t], ctx.table_refs[t](), *next(pairs)) for t in wanted]


def _backward(ctx, grad_out):
    tables, ids, offsets, weights = _unpack(ctx)
    table_index, combiners, mask_ids, max_lens, names = ctx.static
    needs = ctx.needs_input_grad
    table_needs = _per_item(needs[0], ctx.num_tables)
    weight_needs = _per_item(needs[3], ctx.num_weights)
    if create_graph_requested():
        return _differentiable_backward(ctx, grad_out, tables, ids, offsets, weights, table_needs, weight_needs)
    table_grads = [None] * len(tables)
    optimizers = _in_backward_optimizers(ctx, table_needs)
    updates = []
    if any(o is not None for o in optimizers):
        # The coalesced op reads a row-strided gradient in place (the pooled block of the model's
        # [B, pooled + dense] input gradient); the other ops below want it contiguous.
        updates = _in_backward_updates(ctx, optimizers, grad_out, tables, ids, offsets, weights)
        table_needs = [need and o is None for need, o in zip(table_needs, optimizers)]  # no .grad for them
    if any(table_needs) or any(weight_needs):
        grad_out = grad_out.contiguous()
    mask = [int(n) for n in table_needs]
    ops = torch.ops.nextrec_fast
    if any(table_needs) and ctx.sparse_grad:
        flat = ops.pooled_embedding_backward_sparse(grad_out, tables, ids, offsets, weights, ctx.weighted_features, table_index, combiners,
                                                    mask_ids, max_lens, names, ctx.grad_padding_idx, mask)
        pairs = iter(zip(flat[0::2], flat[1::2]))
        for t, need in enumerate(table_needs):
            if need:
                indices, values = next(pairs)
                table_grads[t] = torch.sparse_coo_tensor(indices.unsqueeze(0), values, tables[t].shape,
                                                         check_invariants=False)  # in range by construction
    elif any(table_needs):
        if _grad_reuse_enabled(grad_out):
            owners = [ref() for ref in ctx.table_refs]
            keys = [owner if owner is not None else table for owner, table in zip(owners, tables)]
            buffers = _backward_into_reused_buffers(keys, grad_out, tables, ids, offsets, weights, ctx.weighted_features,
                                                    table_index, combiners, mask_ids, max_lens, names,
                                                    ctx.grad_padding_idx, mask, ctx.deterministic)
        elif torch.compiler.is_compiling() and _grad_reuse_allowed():
            # Traced by torch.compile: an opaque op that takes the reused buffers at run time
            # (a fresh zeroed V x D gradient per table and step cost 8x the backward itself).
            buffers = ops.pooled_embedding_backward_reusing(
                grad_out, tables, ids, offsets, weights, ctx.weighted_features, table_index, combiners, mask_ids,
                max_lens, names, ctx.grad_padding_idx, mask, ctx.deterministic)
        else:
            buffers = ops.pooled_embedding_backward(grad_out, tables, ids, offsets, weights, ctx.weighted_features, table_index, combiners,
                                                    mask_ids, max_lens, names, ctx.grad_padding_idx, mask,
                                                    ctx.deterministic)
        it = iter(buffers)
        table_grads = [next(it) if need else None for need in table_needs]
    weight_grads = [None] * len(weights)
    if any(weight_needs):
        computed = ops.pooled_embedding_weight_backward(grad_out, tables, ids, offsets, weights,
                                                        ctx.weighted_features, table_index, combiners, mask_ids,
                                                        max_lens, names)
        weight_grads = [g if need else None for g, need in zip(computed, weight_needs)]
    # Last: the per-id weights' gradients above read the tables as the forward saw them.
    if updates:  # all tables in one call (the optimisers' class applies them)
        type(updates[0][0]).apply_many(updates)
    grads = [None if n is None else [None] * n for n in ctx.grad_structure]
    grads[0], grads[3] = table_grads, weight_grads
    return tuple(grads)


def _differentiable_backward(ctx, grad_out, tables, ids, offsets, weights, table_needs, weight_needs):
    """The gradients under ``create_graph=True`` (gradient penalties, GradNorm, Hessian-vector
    products): the C++ backward has no derivative of its own, so they come from autograd over
    :func:`reference_pooling` and can be differentiated again."""
    table_index, combiners, mask_ids, max_lens, names = ctx.static
    if ctx.sparse_grad or any(o is not None for o in _in_backward_optimizers(ctx, table_needs)):
        raise NotImplementedError(
            f"pooled_embedding (features {', '.join(map(repr, names))}): create_graph=True needs dense table "
            "gradients; not with sparse_grad=True or apply_optimizer_in_backward")
    out = reference_pooling(tables, ids, offsets, weights, ctx.weighted_features, table_index, combiners, mask_ids,
                            max_lens, ctx.grad_padding_idx)
    computed = grads_with_graph(out, [*tables, *weights], [*table_needs, *weight_needs], grad_out)
    grads = [None if n is None else [None] * n for n in ctx.grad_structure]
    # A table no feature reads (passed along with the others) gets zeros, as from the op.
    grads[0] = [torch.zeros_like(t) if need and g is None else g
                for t, need, g in zip(tables, table_needs, computed[:len(tables)])]
    grads[3] = computed[len(tables):]
    return tuple(grads)


def reference_pooling(tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids, max_lens,
                      grad_padding_idx) -> Tensor:
    """The forward op's output in PyTorch ops (differentiable in the tables and per-id weights;
    arguments as the op takes them: ``combiners`` as codes, ``weights`` for ``weighted_features``):
    jagged bags right-aligned into a padded ``[B, L]`` layout, as nextrec pads sequences."""
    per_feature = [None] * len(ids)
    for f, w in zip(weighted_features, weights):
        per_feature[f] = w
    outs = []
    for f, feature_ids in enumerate(ids):
        table = tables[table_index[f]]
        acc = torch.promote_types(table.dtype, torch.float32)
        seq, w = feature_ids.long(), per_feature[f]
        if offsets[f] is None:
            if seq.dim() == 1:
                seq, w = seq.unsqueeze(1), None if w is None else w.unsqueeze(1)
            valid = torch.ones_like(seq, dtype=torch.bool)
        else:
            seq, valid, w = _right_aligned(seq, offsets[f].long(), w)
        if max_lens[f] >= 0 and seq.shape[1] > max_lens[f]:
            seq, valid = seq[:, -max_lens[f]:], valid[:, -max_lens[f]:]
            w = None if w is None else w[:, -max_lens[f]:]
        pad = grad_padding_idx[table_index[f]]
        emb = F.embedding(seq, table, padding_idx=pad if pad >= 0 else None).to(acc)  # [B, L, D]
        if combiners[f] == _CONCAT:
            outs.append(emb.flatten(1))
            continue
        if w is not None:
            emb = emb * w.to(acc).unsqueeze(-1)
        mask = (valid & (seq != mask_ids[f])).to(acc)
        pooled = (emb * mask.unsqueeze(-1)).sum(1)
        if combiners[f] == _MEAN:
            pooled = pooled / (mask.sum(1, keepdim=True) + 1e-16)
        outs.append(pooled)
    return torch.cat(outs, dim=1).to(tables[0].dtype)


def _right_aligned(values: Tensor, offsets: Tensor, weights: Tensor | None):
    """Jagged ``values`` (bags ``offsets[b]:offsets[b + 1]``) as ``[B, L]`` ids, a validity mask
    and weights, each bag in the last positions of its row."""
    lengths = offsets[1:] - offsets[:-1]
    rows = lengths.numel()
    width = max(int(lengths.max()) if rows else 0, 1)
    bag = torch.repeat_interleave(torch.arange(rows, device=values.device), lengths)
    column = width - lengths[bag] + torch.arange(values.numel(), device=values.device) - offsets[:-1][bag]
    seq = values.new_zeros(rows, width)
    seq[bag, column] = values
    valid = torch.zeros(rows, width, dtype=torch.bool, device=values.device)
    valid[bag, column] = True
    if weights is not None:
        weights = weights.new_zeros(rows, width).index_put((bag, column), weights)
    return seq, valid, weights


def _register_autograd():
    torch.library.register_autograd("nextrec_fast::pooled_embedding_forward", _backward,
                                    setup_context=_setup_context)


def _register() -> bool:
    if not _extension.is_available():
        return False
    _register_fakes()
    _register_autograd()
    return True


_OPS_REGISTERED = _register()
