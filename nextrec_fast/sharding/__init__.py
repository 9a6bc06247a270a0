"""Embedding tables on TorchRec: sharded over processes and machines by its
``DistributedModelParallel``, the dense part (batched experts, gates, towers) data-parallel.

Needs ``pip install "nextrec-fast[torchrec]"`` plus ``torchrec`` and ``fbgemm-gpu-cpu`` (or
``fbgemm-gpu`` on CUDA) installed with ``--no-deps`` (see docs/sharding.md). Importing this
package does not import TorchRec; its functions do.

- ``use_torchrec_tables(model)``: the model's tables into one ``EmbeddingBagCollection``.
- ``KJTCollate`` / ``padded_to_kjt``: nextrec-style padded ids to a ``KeyedJaggedTensor`` in the
  data path.
- ``shard_model(model, ...)``: ``DistributedModelParallel`` with a fused table optimiser and the
  sharding types you allow (or the planner's choice); ``dense_parameters`` for the dense optimiser.
- ``train_pipeline(dmp, loss_fn, dense_optimizer)``: TorchRec's ``TrainPipelineSparseDist``
  (the next batch's ids sent to their tables' ranks while this batch trains) over
  ``ShardedTrainStep``; ``KJTCollate(model, pipelined=True)`` yields its ``KJTBatch``es.
- ``gathered_state_dict`` (whole tables, nextrec's keys, on one rank) and
  ``save_sharded_checkpoint`` / ``load_sharded_checkpoint`` (``torch.distributed.checkpoint``).
"""
from nextrec_fast.sharding.embedding import TorchRecEmbedding, use_torchrec_tables
from nextrec_fast.sharding.jagged import KJT_KEY, POOLED_KEY, KJTCollate, padded_to_kjt
from nextrec_fast.sharding.tables import table_configs
from nextrec_fast.sharding.train import (SHARDING_TYPES, dense_parameters, gathered_state_dict, load_sharded_checkpoint,
                                         save_sharded_checkpoint, shard_model)

__all__ = ["TorchRecEmbedding", "use_torchrec_tables", "KJT_KEY", "POOLED_KEY", "KJTCollate", "padded_to_kjt",
           "table_configs", "shard_model", "dense_parameters", "gathered_state_dict", "save_sharded_checkpoint",
           "load_sharded_checkpoint", "SHARDING_TYPES", "KJTBatch", "ShardedTrainStep", "train_pipeline"]

_PIPELINE = ("KJTBatch", "ShardedTrainStep", "train_pipeline")


def __getattr__(name):
    # The pipeline's classes subclass TorchRec's: loaded (with TorchRec) on first use only.
    if name in _PIPELINE:
        from nextrec_fast.sharding import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
