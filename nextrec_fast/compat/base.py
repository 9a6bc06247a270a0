"""What the fast path needs to know about a nextrec model, as one small interface.

The generic layers (``nextrec_fast.layers``) and the fast forwards (``nextrec_fast.models``)
consume only what is declared here; each nextrec generation has one adapter module beside this
one (``nextrec_v03``, ``nextrec_v06``) and ``nextrec_fast.compat`` picks it by what a model or
layer *can do* (its attributes), never by a version string, so releases between and after the
ones tested keep working as long as they keep those capabilities.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["MODEL_KINDS", "PooledFeatureSpec", "DenseFeatureSpec", "NextrecGeneration", "UnsupportedModelError"]

# The multi-task models with a fast forward; the rest of nextrec's zoo is added here, per kind.
MODEL_KINDS = ("ESMM", "MMOE", "PLE")


class UnsupportedModelError(TypeError, ValueError):
    """A model, layer or feature the fast path cannot take; the message says what and why. A
    TypeError (an unsupported kind of model) and a ValueError (an unsupported configuration)."""


@dataclass(frozen=True)
class PooledFeatureSpec:
    """One sparse or sequence feature as the embedding layer pools it.

    ``combiner`` is "sum" (single-id sparse features too), "mean" or "concat" for the one-call
    pooling op; any other combiner is pooled by ``pooling_module`` (an ``nn.Module`` of the
    layer taking ``([B, L, D] embeddings, [B, 1, L] 0/1 mask)``). ``mask_id``: the id left out
    of sum/mean pooling (-1: none); ``max_len``: keep the last ``max_len`` ids (-1: all)."""
    name: str
    kind: str                 # "sparse" | "sequence"
    table_name: str
    combiner: str
    mask_id: int
    max_len: int
    embedding_dim: int
    vocab_size: int
    pooling_module: nn.Module | None = None

    @property
    def out_dim(self) -> int:
        return self.embedding_dim * self.max_len if self.combiner == "concat" else self.embedding_dim


@dataclass(frozen=True)
class DenseFeatureSpec:
    """One dense feature: ``input_dim`` values per row, passed through or projected by
    ``projection`` (an ``nn.Module``: nextrec's Linear or MLP) to ``out_dim`` columns."""
    name: str
    input_dim: int
    out_dim: int
    projection: nn.Module | None


class NextrecGeneration:
    """One nextrec generation's internals, behind the methods the fast path calls.

    ``recognises_model`` / ``recognises_layer`` decide by capability; the other methods may assume
    a model or layer this generation recognised."""

    name = "?"
    # Module prefixes under which nextrec keeps its multi-task models in this generation.
    model_packages: tuple[str, ...] = ()
    # EmbeddingLayer.forward's default for squeeze_dim.
    squeeze_dim_default = True

    # -- recognition ----------------------------------------------------------------------
    def recognises_model(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def recognises_layer(self, layer: nn.Module) -> bool:
        raise NotImplementedError

    def model_kind(self, model: nn.Module) -> str | None:
        """'ESMM', 'MMOE' or 'PLE' for nextrec's class (or a subclass of it), else None."""
        for cls in type(model).__mro__:
            if cls.__name__ in MODEL_KINDS and cls.__module__.startswith(self.model_packages):
                return cls.__name__
        return None

    # -- the model ------------------------------------------------------------------------
    def num_tasks(self, model: nn.Module) -> int:
        raise NotImplementedError

    def multitask_output(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """What the model's forward returns from its towers' ``[B, T]`` logits."""
        raise NotImplementedError

    def esmm_output(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """What ESMM's forward returns from its ``[B, 2]`` (ctr, cvr) tower logits."""
        raise NotImplementedError

    def plain_forward_needed(self, model: nn.Module) -> bool:
        """Whether this call must run nextrec's own forward (ONNX export, double backward, ...)."""
        return torch.onnx.is_in_onnx_export()

    def regularization_groups(self, model: nn.Module) -> list[tuple[list, float, float]]:
        """(parameters, l1 weight, l2 weight) per group nextrec's ``add_reg_loss`` sums over."""
        raise NotImplementedError

    def regularization_terms(self, model: nn.Module) -> list[tuple[torch.Tensor, float, float]]:
        """(parameter, l1, l2) as nextrec's ``add_reg_loss`` weighs them (a parameter listed twice
        counts twice, as there; weights <= 0 are off)."""
        terms = []
        for params, l1, l2 in self.regularization_groups(model):
            l1 = float(l1) if l1 > 0 else 0.0
            l2 = float(l2) if l2 > 0 else 0.0
            if params and (l1 or l2):
                terms += [(p, l1, l2) for p in params]
        return terms

    # -- the embedding layer --------------------------------------------------------------
    def embedding_plan(self, layer: nn.Module) -> tuple[list[PooledFeatureSpec], list[DenseFeatureSpec]]:
        """The layer's features in its output order (pooled ones first, then dense ones)."""
        raise NotImplementedError

    def dense_value(self, value: torch.Tensor, model_dtype: torch.dtype | None) -> torch.Tensor:
        """A dense input column cast as nextrec casts it (``.float()``), except that a float64
        model keeps float64 (the precision tests run whole models in float64). ``model_dtype``:
        the embedding layer's parameters' dtype (its output's with 16-bit tables), None without."""
        return value.to(torch.float64 if model_dtype == torch.float64 else torch.float32)

    # -- nextrec's training loop ----------------------------------------------------------
    # (module, function) of nextrec's per-row sequence-column padding, and its rule for a feature:
    sequence_column_function: tuple[str, str] = ("", "")

    def sequence_padding(self, feature) -> tuple[int, int] | None:
        """(max_len, pad value) as nextrec's padding function reads them from ``feature``, or None
        where only nextrec's own function knows what to do."""
        raise NotImplementedError

    @contextlib.contextmanager
    def fast_sequence_columns(self):
        """Within this context nextrec's data path pads sequence columns with
        ``nextrec_fast.integration.data.pad_sequence_column`` (identical arrays, vectorised),
        falling back to nextrec's function for anything else."""
        from nextrec_fast.integration.data import pad_sequence_column
        module_name, name = self.sequence_column_function
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def padded(column, feature):
            rule = self.sequence_padding(feature)
            out = pad_sequence_column(column, *rule) if rule is not None else None
            return out if out is not None else original(column, feature)

        setattr(module, name, padded)
        try:
            yield
        finally:
            setattr(module, name, original)

    def fast_data_loader(self, model: nn.Module, plain, data, batch_size: int, shuffle: bool, options: dict):
        """nextrec's loader for in-memory ``data``, batched by indexing whole columns (same
        batches, same order, same random stream), or ``plain()`` where that does not apply."""
        return plain()

    # -- building nextrec's own objects (benchmarks, demos, datasets) ---------------------
    def is_installed(self) -> bool:
        """Whether the installed nextrec is this generation (its model package exists)."""
        try:
            return importlib.util.find_spec(self.model_packages[0].rstrip(".")) is not None
        except ImportError:  # no nextrec at all
            return False

    def model_class(self, kind: str) -> type:
        """nextrec's class for ``kind`` ('esmm', 'mmoe' or 'ple', any case)."""
        module = importlib.import_module(self.model_packages[0] + kind.lower())
        return getattr(module, kind.upper())

    def features(self, dense: list[dict], sparse: list[dict], sequence: list[dict]) -> tuple[list, list, list]:
        """nextrec's DenseFeature / SparseFeature / SequenceFeature objects from argument dicts
        (``name``, ``vocab_size``, ``embedding_dim``, ``padding_idx``, ``max_len``, ``combiner``,
        ``embedding_name``, ``input_dim``: the names both generations share)."""
        from nextrec.basic import features as nf
        return ([nf.DenseFeature(**f) for f in dense], [nf.SparseFeature(**f) for f in sparse],
                [nf.SequenceFeature(**f) for f in sequence])

    def probabilities(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """``[B, T]`` task probabilities as nextrec's ``predict`` gives them, from a batch dict of
        tensors (0.3: the forward; 0.6: the training adapter over ``call_model``, the forward then
        the task head)."""
        return model(batch)

    def model_arguments(self, kind: str, kwargs: dict) -> dict:
        """A model's keyword arguments, given in nextrec 0.3's names (``expert_params``,
        ``tower_params_list``, MLPs as ``{"dims": [...]}``), in this generation's names."""
        return dict(kwargs)


def pooled_spec(feature, kind: str, combiner: str, mask_id: int, max_len, pooling_module=None) -> PooledFeatureSpec:
    """A PooledFeatureSpec from a nextrec feature's common fields."""
    return PooledFeatureSpec(
        name=feature.name, kind=kind, table_name=feature.embedding_name, combiner=combiner, mask_id=int(mask_id),
        max_len=-1 if max_len is None else int(max_len), embedding_dim=int(feature.embedding_dim),
        vocab_size=int(feature.vocab_size), pooling_module=pooling_module)
