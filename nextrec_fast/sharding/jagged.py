"""nextrec-style batches (padded id tensors) as TorchRec ``KeyedJaggedTensor``s, in the data path.

The conversion applies the embedding layer's own rules, so a TorchRec table pools exactly what
the fast layer pools: a sequence feature keeps its last ``max_len`` positions, then drops its
mask id (nextrec's padding, 0 by default); a sparse feature keeps its one id per row. Keys come in
table-config order (``table_configs``), one jagged list of ``B`` rows each.
"""
from __future__ import annotations

import torch

from nextrec_fast.compat import PooledFeatureSpec
from nextrec_fast.features import SPARSE

__all__ = ["KJT_KEY", "POOLED_KEY", "padded_to_kjt", "KJTCollate"]

# The batch-dict key under which a model with TorchRec tables takes its sparse and sequence ids.
KJT_KEY = "kjt"
# The key under which TorchRec's pipeline hands the model the tables' pooled ``KeyedTensor``,
# looked up before the model runs (``ShardedTrainStep``).
POOLED_KEY = "pooled"


def _jagged(slot: PooledFeatureSpec, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, lengths [B]) of one feature's padded ids."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"feature {slot.name!r}: expected a torch.Tensor of ids, got {type(ids).__name__} "
                        "(torch.as_tensor(...) it first)")
    if ids.is_floating_point():
        raise TypeError(f"feature {slot.name!r}: ids must be integers, got {ids.dtype}")
    ids = ids.long()
    if slot.kind == SPARSE:
        flat = ids.reshape(-1)
        return flat, torch.ones(flat.shape[0], dtype=torch.long, device=ids.device)
    if ids.dim() != 2:
        raise ValueError(f"sequence feature {slot.name!r}: expected padded ids [B, L], got shape {tuple(ids.shape)}")
    if slot.max_len > 0:
        ids = ids[:, -slot.max_len:]
    if slot.mask_id >= 0:
        keep = ids != slot.mask_id
        return ids[keep], keep.sum(1)
    return ids.reshape(-1), torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)


def padded_to_kjt(batch: dict, slots: tuple[PooledFeatureSpec, ...], keys: list[str]):
    """One ``KeyedJaggedTensor`` of the features ``keys`` (in that order) from a batch dict.

    Args:
        batch (dict[str, Tensor]): sparse ids ``[B]`` or ``[B, 1]``, sequence ids ``[B, L]``
            (integer dtypes; padded with the feature's mask id).
        slots (sequence of PooledFeatureSpec): the layer's pooled features (``layer.slots``).
        keys (list[str]): feature names in table-config order.

    Returns:
        KeyedJaggedTensor: int64 values and lengths, ``stride() == B``.

    Raises:
        KeyError: a feature missing from ``batch``. TypeError / ValueError: float ids, a
        non-tensor, or a sequence feature not shaped ``[B, L]`` (named in the message).
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    by_name = {s.name: s for s in slots}
    values, lengths, batch_size = [], [], None
    for key in keys:
        if key not in batch:
            raise KeyError(f"feature {key!r} is missing from the batch (keys: {sorted(batch)})")
        v, n = _jagged(by_name[key], batch[key])
        if batch_size is None:
            batch_size = n.shape[0]
        elif n.shape[0] != batch_size:
            raise ValueError(f"feature {key!r} has {n.shape[0]} rows where the others have {batch_size}")
        values.append(v)
        lengths.append(n)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.cat(values), lengths=torch.cat(lengths))


class KJTCollate:
    """A ``DataLoader`` ``collate_fn`` (or a transform of a collated batch) for a model with
    TorchRec tables: the pooled features' ids become one ``KeyedJaggedTensor`` under
    ``batch["kjt"]``; dense columns and labels pass through unchanged.

    Args:
        model_or_layer (nn.Module): a model after ``shard_model`` / ``use_torchrec_tables``, the
            ``DistributedModelParallel`` around it, or its embedding layer.
        collate (callable, optional): the collate to run first (default
            ``torch.utils.data.default_collate``); pass None to call it on already-batched dicts.
        pipelined (bool): return a ``KJTBatch`` (``nextrec_fast.sharding.pipeline``), the batch
            TorchRec's ``TrainPipelineSparseDist`` moves, instead of a dict.
    """

    _DEFAULT = object()

    def __init__(self, model_or_layer, collate=_DEFAULT, pipelined: bool = False):
        model = getattr(model_or_layer, "module", model_or_layer)  # a DistributedModelParallel: its model
        layer = getattr(model, "embedding", model)
        if not hasattr(layer, "kjt_keys"):
            raise TypeError(f"KJTCollate takes a model on TorchRec tables (after nextrec_fast.sharding.shard_model(model) "
                            f"or use_torchrec_tables(model)), or shard_model's result; got {type(model_or_layer).__name__}")
        self.slots, self.keys = layer.slots, layer.kjt_keys
        if collate is KJTCollate._DEFAULT:
            from torch.utils.data import default_collate
            collate = default_collate
        self.collate = collate
        self.batch_class = None
        if pipelined:  # resolved once here, not per batch in the data path
            from nextrec_fast.sharding.pipeline import KJTBatch
            self.batch_class = KJTBatch

    def __call__(self, samples):
        batch = self.collate(samples) if self.collate is not None else samples
        pooled = set(self.keys)
        out = {k: v for k, v in batch.items() if k not in pooled}
        kjt = padded_to_kjt(batch, self.slots, self.keys)
        if self.batch_class is not None:
            return self.batch_class(kjt, out)
        out[KJT_KEY] = kjt
        return out
