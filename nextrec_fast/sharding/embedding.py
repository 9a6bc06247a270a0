"""A fast model's embedding layer on TorchRec tables, so that ``DistributedModelParallel`` can
shard them (table-, row-, column-wise, data-parallel, as its planner decides).

``use_torchrec_tables(model)`` swaps ``model.embedding`` (ours, or an ``accelerate()``d nextrec
layer) for a ``TorchRecEmbedding`` holding one ``torchrec.EmbeddingBagCollection`` with the same
table Parameters (no copy). The rest of the model is untouched: the batched experts, gates and
towers run as they did, under the DDP that DMP wraps around the dense part.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nextrec_fast.compat import UnsupportedModelError
from nextrec_fast.layers.embedding import FastEmbeddingMixin
from nextrec_fast.sharding.jagged import KJT_KEY, POOLED_KEY, padded_to_kjt
from nextrec_fast.sharding.tables import _import_torchrec, table_configs, torchrec_poolable_tables

__all__ = ["TorchRecEmbedding", "use_torchrec_tables"]

_NEXTREC_PREFIX, _TORCHREC_PREFIX = "embed_dict.", "ebc.embedding_bags."


class TorchRecEmbedding(nn.Module):
    """The pooled features through a ``torchrec.EmbeddingBagCollection`` (``self.ebc``), the
    dense ones as the fast layer computes them; the output in nextrec's column order.

    Constructor Args:
        layer (nn.Module): a fast embedding layer (``model.embedding`` of a nextrec_fast model
            or of an ``accelerate()``d nextrec model). Its table Parameters move into the
            collection (same objects); its other submodules (dense projections, poolings, the
            tables TorchRec cannot pool) are kept under the same names.

    Call Args:
        x (dict[str, Tensor | KeyedJaggedTensor]): ``x["kjt"]``: the pooled features' ids as one
            ``KeyedJaggedTensor`` (``KJTCollate`` builds it in the data path, as TorchRec's
            pipeline needs), or, without it, nextrec's padded id tensors (converted here, on the
            fly); dense columns ``[B]`` or ``[B, input_dim]`` as nextrec takes them.
            ``x["pooled"]``, when present: the collection's output for this batch, looked up
            already (``ShardedTrainStep``, TorchRec's pipeline); the collection is not called.

    Returns:
        Tensor: ``[B, sum of output dims]``, pooled features in feature order, then dense ones:
        what the fast layer returns for the same weights (nextrec's ``squeeze_dim=True`` layout).

    state_dict keys are nextrec's (``embed_dict.<table>.weight``) both ways, so a nextrec or
    nextrec_fast checkpoint loads, and a sharded model's state_dict (ShardedTensors under the same
    keys) maps back onto an unsharded one.

    Tables TorchRec cannot pool for every feature reading them (``concat``, nextrec 0.6's
    attention poolings, sequences of different combiners sharing a table) stay ``nn.Embedding``s
    in ``self.embed_dict``, pooled by nextrec_fast's op from the padded ids in the batch, and
    replicated on every rank (DDP) when sharded, trained by the dense optimiser.

    Raises:
        UnsupportedModelError: no table TorchRec can pool; tables under ``nextrec_fast.optim``'s
            in-backward optimiser (use TorchRec's fused one instead).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        if not hasattr(layer, "slots") or not hasattr(layer, "embed_dict"):
            raise TypeError("TorchRecEmbedding takes a fast embedding layer: the embedding of a nextrec_fast model "
                            "or of a nextrec model after nextrec_fast.accelerate(model) (call that first)")
        torchrec = _import_torchrec()
        from nextrec_fast.ops.pooled_embedding import IN_BACKWARD_ATTR
        weights = {name: table.weight for name, table in layer.embed_dict.items()}
        if any(getattr(w, IN_BACKWARD_ATTR, None) is not None for w in weights.values()):
            raise UnsupportedModelError(
                "the tables are under nextrec_fast.optim.apply_optimizer_in_backward, which TorchRec's modules never "
                "call; remove it (remove_optimizer_in_backward) and give TorchRec its fused optimiser "
                "(torchrec.optim.apply_optimizer_in_backward, or shard_model(table_optimizer=...))")
        read = {s.table_name for s in layer.slots}
        unused = sorted(set(weights) - read)
        if unused:
            raise UnsupportedModelError(f"tables {unused} are read by no pooled feature; TorchRec would shard them "
                                        "anyway: drop them from the model first")
        # Tables TorchRec cannot pool for every reader (concat, attention poolings, mixed combiners)
        # stay nn.Embeddings pooled by our op, replicated on every rank like the dense part.
        moved = set(torchrec_poolable_tables(layer.slots))
        if not moved:
            raise UnsupportedModelError("no table TorchRec can pool (combiners sum / mean, one per table): "
                                        "keep this model on nextrec_fast's own pooling")
        torchrec_slots = [s for s in layer.slots if s.table_name in moved]
        own_slots = [s for s in layer.slots if s.table_name not in moved]
        configs = table_configs(tuple(torchrec_slots), {name: weights[name].shape[0] for name in moved})
        self.features, self._compat = layer.features, layer._compat
        self.slots, self.dense_specs = layer.slots, layer.dense_specs
        self.kjt_keys = [name for c in configs for name in c.feature_names]
        self._torchrec_tables = frozenset(moved)
        # On the meta device, then the layer's own Parameters put in: no second copy of the tables.
        self.ebc = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        device = None
        for name, bag in self.ebc.embedding_bags.items():
            bag.weight = weights[name]
            device = weights[name].device
        self.ebc._device = device
        # The other tables under their own names: state_dict keys embed_dict.<table>.weight as before.
        self.embed_dict = nn.ModuleDict({name: table for name, table in layer.embed_dict.items() if name not in moved})
        for name, module in layer.named_children():  # dense projections, poolings: same names
            if name != "embed_dict":
                self.add_module(name, module)
        self._own = _OwnPooling(self.embed_dict, own_slots, layer._compat) if own_slots else None
        self._register_state_dict_hook(_to_nextrec_keys)
        self.register_load_state_dict_pre_hook(_to_torchrec_keys)

    def tables(self) -> list[torch.Tensor]:
        """TorchRec's table weights, in table-config order (``ShardedTensor``s once DMP has sharded
        them); the tables kept on our op are ``self.embed_dict``'s."""
        return [bag.weight for bag in self.ebc.embedding_bags.values()]

    def forward(self, x: dict, features=None, squeeze_dim: bool | None = None, **kwargs) -> torch.Tensor:
        if squeeze_dim is False or kwargs.get("sequence_output", "pooled") != "pooled" or (
                features is not None and [f.name for f in features] != [f.name for f in self.features]):
            raise NotImplementedError("TorchRecEmbedding computes the multi-task models' layout only (all features, "
                                      "pooled, squeeze_dim=True)")
        if not isinstance(x, dict):
            raise TypeError(f"the model takes a batch dict (KJTCollate(model)), got {type(x).__name__}"
                            + ("; a KJTBatch (KJTCollate(model, pipelined=True)) is for train_pipeline / ShardedTrainStep"
                               if type(x).__name__ == "KJTBatch" else ""))
        pooled = x.get(POOLED_KEY)
        if pooled is None:
            kjt = x.get(KJT_KEY)
            if kjt is None:
                kjt = padded_to_kjt(x, self.slots, self.kjt_keys)
            pooled = self.ebc(kjt)
        # By key, never by position: a sharded collection returns its keys in shard order.
        pooled = pooled.to_dict()
        if self._own is not None:  # the tables TorchRec cannot pool, by our op, from padded ids
            own = self._own.pool(x).split([s.out_dim for s in self._own.slots], dim=1)
            pooled.update(zip([s.name for s in self._own.slots], own))
        pieces = [pooled[s.name] for s in self.slots]
        if self.dense_specs:
            param = next(self.parameters(), None)  # dense inputs take the model's dtype
            model_dtype = param.dtype if param is not None else None
            pieces += [FastEmbeddingMixin._dense_column(self, spec, x, model_dtype) for spec in self.dense_specs]
        return torch.cat(pieces, dim=1)


class _OwnPooling(FastEmbeddingMixin):
    """Our pooling op over the tables TorchRec does not hold: the fast layer's ``pool`` on a plan
    of just those features (no module of its own: the tables and pooling modules are the
    TorchRecEmbedding's)."""

    def __init__(self, embed_dict: nn.ModuleDict, slots, generation):
        self.embed_dict, self._compat = embed_dict, generation
        self._set_plan(list(slots), [])


def _rename(state_dict, prefix: str, old: str, new: str, tables) -> None:
    """Rename ``prefix+old+<table>.rest`` keys to ``prefix+new+<table>.rest`` for ``tables``, in
    place, keeping the order."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix + old) and key[len(prefix + old):].split(".", 1)[0] in tables:
            key = prefix + new + key[len(prefix + old):]
        state_dict[key] = value


def _to_nextrec_keys(module, state_dict, prefix, local_metadata):
    _rename(state_dict, prefix, _TORCHREC_PREFIX, _NEXTREC_PREFIX, module._torchrec_tables)


def _to_torchrec_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _rename(state_dict, prefix, _NEXTREC_PREFIX, _TORCHREC_PREFIX, module._torchrec_tables)


def use_torchrec_tables(model: nn.Module) -> nn.Module:
    """Put ``model``'s embedding tables into a TorchRec ``EmbeddingBagCollection``, in place.

    Args:
        model (nn.Module): a nextrec_fast ESMM / MMOE / PLE, or an ``accelerate()``d nextrec one.

    Returns:
        The same model; ``model.embedding`` is a ``TorchRecEmbedding`` (a no-op if it already is).
        Forward results are unchanged (the same pooled sums and means; padding ids dropped).

    Raises:
        TypeError: a model without a fast embedding layer. UnsupportedModelError: see
        ``TorchRecEmbedding``. ImportError: TorchRec not installed (the message says how).
    """
    layer = getattr(model, "embedding", None)
    if isinstance(layer, TorchRecEmbedding):
        return model
    if layer is None:
        raise TypeError(f"{type(model).__name__} has no .embedding layer: use_torchrec_tables takes a nextrec_fast "
                        "model or a nextrec model after nextrec_fast.accelerate(model)")
    model.embedding = TorchRecEmbedding(layer)
    return model
