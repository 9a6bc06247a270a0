"""TorchRec table configs from a fast embedding layer's plan.

One ``EmbeddingBagConfig`` per table (nextrec's ``embedding_name``), its ``feature_names`` the
features that read it, in the layer's feature order. A TorchRec table has one pooling mode: SUM
for sparse features and for sequence features with combiner "sum", MEAN for "mean". A sparse
feature holds one id per row, where SUM and MEAN agree, so it can share a MEAN table.
"""
from __future__ import annotations

from nextrec_fast.compat import PooledFeatureSpec, UnsupportedModelError
from nextrec_fast.features import SPARSE

__all__ = ["table_configs", "torchrec_poolable_tables", "TORCHREC_COMBINERS"]

# The combiners TorchRec's pooled embedding bags compute (no concat, no attention).
TORCHREC_COMBINERS = ("sum", "mean")


def _import_torchrec():
    try:
        import torchrec
    except ImportError as e:  # fbgemm raises ImportError/OSError on a torch it was not built for
        raise ImportError(
            "nextrec_fast.sharding needs TorchRec: pip install \"nextrec-fast[torchrec]\" then "
            "pip install --no-deps torchrec==1.9.2 fbgemm-gpu-cpu==1.9.0 (docs/sharding.md, Install; "
            f"fbgemm must match the installed torch). Import failed with: {e}") from e
    return torchrec


def _slot_problem(slot: PooledFeatureSpec) -> str | None:
    """Why TorchRec cannot pool this feature (None: it can)."""
    if slot.combiner not in TORCHREC_COMBINERS or slot.pooling_module is not None:
        return (f"feature {slot.name!r}: TorchRec's pooled tables compute sum and mean, not combiner "
                f"{slot.combiner!r}; use sum or mean for it, or keep this model's tables on nextrec_fast's "
                "own pooling (no TorchRec)")
    return None


def _table_problem(table: str, readers: list[PooledFeatureSpec]) -> str | None:
    """Why one TorchRec table cannot serve all these readers (None: it can): one pooling mode per
    table, and a sparse feature's one id pools the same under either."""
    sequence = [s for s in readers if s.kind != SPARSE]
    if len({s.combiner for s in sequence}) > 1:
        return (f"table {table!r} is read by sequence features with different combiners "
                f"({', '.join(f'{s.name!r}: {s.combiner}' for s in sequence)}); a TorchRec "
                "table has one pooling mode: give them one combiner or separate tables (embedding_name)")
    return None


def _readers(slots) -> dict[str, list[PooledFeatureSpec]]:
    readers: dict[str, list[PooledFeatureSpec]] = {}
    for slot in slots:
        readers.setdefault(slot.table_name, []).append(slot)
    return readers


def torchrec_poolable_tables(slots: tuple[PooledFeatureSpec, ...]) -> list[str]:
    """The tables (in first-read order) whose every reader TorchRec can pool: combiner sum or mean
    without a pooling module of its own, and one pooling mode over the sequence features reading
    it. The others stay on nextrec_fast's own pooling op."""
    return [table for table, rs in _readers(slots).items()
            if not any(_slot_problem(s) for s in rs) and _table_problem(table, rs) is None]


def table_configs(slots: tuple[PooledFeatureSpec, ...], num_embeddings: dict[str, int]) -> list:
    """``torchrec.EmbeddingBagConfig`` per table, in the order the tables are first read.

    Args:
        slots (sequence of PooledFeatureSpec): the layer's pooled features (``layer.slots``).
        num_embeddings (dict[str, int]): rows per table name (the table's real row count, which
            may exceed a feature's ``vocab_size``).

    Returns:
        list[EmbeddingBagConfig]: name = table name, ``feature_names`` in feature order.

    Raises:
        UnsupportedModelError: a feature whose combiner TorchRec cannot pool (concat, nextrec
            0.6's attention poolings), or sequence features with different combiners sharing a
            table; the message names the feature.
    """
    torchrec = _import_torchrec()
    from torchrec.modules.embedding_configs import PoolingType

    for slot in slots:
        problem = _slot_problem(slot)
        if problem:
            raise UnsupportedModelError(problem)
    configs = []
    for table, readers in _readers(slots).items():
        problem = _table_problem(table, readers)
        if problem:
            raise UnsupportedModelError(problem)
        combiners = {s.combiner for s in readers if s.kind != SPARSE}
        pooling = PoolingType.MEAN if combiners == {"mean"} else PoolingType.SUM
        dims = {s.embedding_dim for s in readers}
        if len(dims) > 1:
            raise UnsupportedModelError(f"table {table!r} is read with different embedding dims {sorted(dims)}")
        configs.append(torchrec.EmbeddingBagConfig(
            name=table, embedding_dim=readers[0].embedding_dim, num_embeddings=int(num_embeddings[table]),
            feature_names=[s.name for s in readers], pooling=pooling))
    return configs
