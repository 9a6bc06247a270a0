"""Training a sharded model on TorchRec's ``TrainPipelineSparseDist``: the next batch's ids travel
to the ranks holding their tables (``input_dist``, an all-to-all) while this batch's forward and
backward run.

The pipeline finds the sharded tables' input by fx-tracing the model it is given and moves only a
call whose input is a plain attribute of the batch. nextrec's forward (and ours, around it) is not
traceable, so the pipeline gets ``ShardedTrainStep``: the table lookup first, on
``batch.sparse_features``, then the model on the pooled result (``TorchRecEmbedding`` takes it
under ``"pooled"`` instead of looking up again), then the loss. TorchRec's tracer treats the DDP
around the dense part and every module without a sharded table inside as one opaque call, so
only this forward has to trace.

Importing this module imports TorchRec (``nextrec_fast.sharding`` loads it on first use).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from nextrec_fast.sharding.jagged import KJT_KEY, POOLED_KEY

__all__ = ["KJTBatch", "ShardedTrainStep", "train_pipeline"]


class KJTBatch(Pipelineable):
    """One batch in the form TorchRec's pipeline moves between devices and streams.

    Args:
        sparse_features (KeyedJaggedTensor): the ids of the features on TorchRec tables
            (``padded_to_kjt``; ``KJTCollate(model, pipelined=True)`` builds the whole batch).
        dense (dict[str, Tensor]): everything else of the batch dict: dense columns ``[B]`` /
            ``[B, k]``, labels, padded ids of features kept on our own pooling.
    """

    def __init__(self, sparse_features: KeyedJaggedTensor, dense: dict):
        self.sparse_features = sparse_features
        self.dense = dense

    def to(self, device: torch.device, non_blocking: bool = False) -> "KJTBatch":
        return KJTBatch(self.sparse_features.to(device=device, non_blocking=non_blocking),
                        {k: v.to(device=device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                         for k, v in self.dense.items()})

    def record_stream(self, stream) -> None:
        self.sparse_features.record_stream(stream)
        for v in self.dense.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(stream)

    def pin_memory(self) -> "KJTBatch":
        return KJTBatch(self.sparse_features.pin_memory(),
                        {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.dense.items()})

    def model_input(self, pooled=None) -> dict:
        """The batch dict the model takes: ``dense`` plus ``"kjt"`` (and ``"pooled"``, the tables'
        ``KeyedTensor``, when the lookup already ran)."""
        out = dict(self.dense)
        out[KJT_KEY] = self.sparse_features
        if pooled is not None:
            out[POOLED_KEY] = pooled
        return out


class _Loss(nn.Module):
    """The user's loss as a module: TorchRec's tracer calls it opaquely (a child without sharded
    tables is a leaf), so any Python in it is fine."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, outputs, dense):
        return self.loss_fn(outputs, dense)


class ShardedTrainStep(nn.Module):
    """The forward ``TrainPipelineSparseDist`` runs: table lookup, model, loss.

    Args:
        dmp (DistributedModelParallel): ``shard_model``'s result.
        loss_fn (callable): ``loss_fn(outputs, dense) -> Tensor`` (a scalar): ``outputs`` what
            the model returns (nextrec 0.3: probabilities, 0.6: logits), ``dense`` the batch's
            dict of dense columns and labels.

    Call Args:
        batch (KJTBatch): one batch.

    Returns:
        (loss, outputs): the pair the pipeline expects; ``pipeline.progress`` returns ``outputs``.
    """

    def __init__(self, dmp: nn.Module, loss_fn):
        super().__init__()
        from nextrec_fast.sharding.embedding import TorchRecEmbedding
        if not isinstance(getattr(getattr(dmp, "module", None), "embedding", None), TorchRecEmbedding):
            raise TypeError("train_pipeline / ShardedTrainStep take the DistributedModelParallel that "
                            f"nextrec_fast.sharding.shard_model(model) returns, got {type(dmp).__name__}")
        self.model = dmp
        self.loss = _Loss(loss_fn)

    def forward(self, batch: KJTBatch):
        if not isinstance(batch, torch.fx.Proxy):  # the pipeline fx-traces this forward once
            _check_batch(batch)
        # The lookup on a plain attribute of the batch: what the pipeline can run a batch ahead.
        pooled = self.model.module.embedding.ebc(batch.sparse_features)
        outputs = self.model(batch.model_input(pooled))
        return self.loss(outputs, batch.dense), outputs


def _check_batch(batch) -> None:
    if not isinstance(batch, KJTBatch):
        raise TypeError(f"train_pipeline's batches are KJTBatch (DataLoader(..., collate_fn=KJTCollate(model, "
                        f"pipelined=True))), got {type(batch).__name__}")


class _CheckedPipeline(TrainPipelineSparseDist):
    """TorchRec's pipeline, with the batches checked as they come out of the iterator (TorchRec's
    own check fails later, deep inside, without naming the fix)."""

    def progress(self, dataloader_iter):
        return super().progress(_Checked(dataloader_iter))


class _Checked:
    """The user's iterator, each batch checked. An iterable that is not an iterator (a DataLoader)
    is refused: wrapped anew every step it would restart at its first batch."""

    def __init__(self, iterator):
        if iter(iterator) is not iterator:
            raise TypeError(f"pipeline.progress takes an iterator over the batches (it = iter(loader), then "
                            f"progress(it) every step), got a {type(iterator).__name__}")
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        _check_batch(batch)
        return batch


def train_pipeline(dmp: nn.Module, loss_fn, dense_optimizer: torch.optim.Optimizer, *,
                   device: torch.device | None = None, execute_all_batches: bool = True) -> TrainPipelineSparseDist:
    """TorchRec's ``TrainPipelineSparseDist`` over ``ShardedTrainStep(dmp, loss_fn)``.

    Args:
        dmp: ``shard_model``'s result (its fused table optimiser steps inside the backward).
        loss_fn: see ``ShardedTrainStep``.
        dense_optimizer (torch.optim.Optimizer): over ``dense_parameters(dmp)``; the pipeline
            zeroes, and steps it after every backward.
        device (torch.device, optional): default: the DMP's device.
        execute_all_batches (bool): run the batches still in the pipeline when the data ends.

    Returns:
        TrainPipelineSparseDist: call ``progress(iterator)`` per step (it returns the model's
        outputs; ``StopIteration`` when the data ends). The iterator yields ``KJTBatch``es
        (``DataLoader(..., collate_fn=KJTCollate(model, pipelined=True))``).

    The results equal a plain loop over the same batches (``ShardedTrainStep`` called, loss
    backward, optimiser step): the pipeline moves only ids ahead, never weights.
    """
    step = ShardedTrainStep(dmp, loss_fn)
    return _CheckedPipeline(step, dense_optimizer, device if device is not None else dmp.device,
                                   execute_all_batches=execute_all_batches)
