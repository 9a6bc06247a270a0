"""nextrec 0.3.x (and 0.2.7), and nextrec_fast's own drop-in models, which copy its layout.

Recognised by capability: a model with a ``prediction_layer`` (its forward returns
probabilities), an EmbeddingLayer without ``sequence_poolings`` (combiners sum / mean / concat
computed inline), dense features with ``use_embedding``, regularisation in ``_embedding_params``
/ ``_regularization_weights`` with ``_embedding_l1_reg``-style weights, and the data path
``_prepare_data_loader`` -> ``nextrec.basic.model.build_tensors_from_data``.
"""
from __future__ import annotations

import torch

from nextrec_fast.compat.base import (DenseFeatureSpec, NextrecGeneration, UnsupportedModelError,
                                      pooled_spec)
from nextrec_fast.features import DENSE, SPARSE, feature_kind

__all__ = ["NextrecV03", "V03"]


def dense_input_dim(feature) -> int:
    return max(int(getattr(feature, "input_dim", 1) or 1), 1)


def dense_output_dim(feature) -> int:
    """Columns a 0.3 dense feature adds to the embedding output (``embedding_dim``, else input_dim)."""
    emb_dim = getattr(feature, "embedding_dim", None)
    return max(int(emb_dim), 1) if emb_dim else dense_input_dim(feature)


class NextrecV03(NextrecGeneration):
    name = "0.3"
    model_packages = ("nextrec.models.multi_task.",)
    squeeze_dim_default = True

    def recognises_model(self, model) -> bool:
        return hasattr(model, "prediction_layer") and not hasattr(model, "call_model")

    def recognises_layer(self, layer) -> bool:
        return hasattr(layer, "embed_dict") and not hasattr(layer, "sequence_poolings")

    def num_tasks(self, model) -> int:
        return int(getattr(model, "num_tasks", None) or len(model.towers))

    def multitask_output(self, model, logits):
        return model.prediction_layer(logits)

    def esmm_output(self, model, logits):
        ctr, cvr = model.prediction_layer(logits).chunk(2, dim=1)
        return torch.cat([ctr, ctr * cvr], dim=1)

    def dense_value(self, value, model_dtype):
        # 0.3 casts with .float(); the drop-in models cast to their own floating dtype (the same
        # for float32 models; float64 models stay float64, half models stay half).
        return value.to(model_dtype if model_dtype is not None and model_dtype.is_floating_point else torch.float32)

    def regularization_groups(self, model):
        return [(model._embedding_params, model._embedding_l1_reg, model._embedding_l2_reg),
                (model._regularization_weights, model._dense_l1_reg, model._dense_l2_reg)]

    def embedding_plan(self, layer):
        pooled, dense = [], []
        for feature in layer.features:
            kind = feature_kind(feature)
            if kind == DENSE:
                projection = layer.dense_transforms[feature.name] if feature.use_embedding else None
                input_dim = layer.dense_input_dims.get(feature.name, dense_input_dim(feature))
                out_dim = dense_output_dim(feature)
                if projection is None and out_dim != input_dim:
                    raise UnsupportedModelError(
                        f"dense feature {feature.name!r}: use_embedding=False passes its {input_dim} input value(s) "
                        f"through, but embedding_dim={feature.embedding_dim} says otherwise; set embedding_dim=None "
                        "(or equal to input_dim) or use_embedding=True")
                dense.append(DenseFeatureSpec(feature.name, input_dim, out_dim, projection))
            elif kind == SPARSE:
                pooled.append(pooled_spec(feature, kind, "sum", -1, None))
            else:
                combiner = feature.combiner
                if combiner not in ("sum", "mean", "concat"):
                    raise UnsupportedModelError(f"Unknown combiner for {feature.name}: {combiner}")
                mask_id = -1 if combiner == "concat" else (feature.padding_idx if feature.padding_idx is not None else 0)
                pooled.append(pooled_spec(feature, kind, combiner, mask_id, feature.max_len))
        return pooled, dense

    sequence_column_function = ("nextrec.data.dataloader", "_normalize_sequence_column")

    def sequence_padding(self, feature):
        max_len, pad = getattr(feature, "max_len", 0), getattr(feature, "padding_idx", 0)
        return None if max_len is None or pad is None else (int(max_len), int(pad))

    def fast_data_loader(self, model, plain, data, batch_size, shuffle, options):
        from torch.utils.data import DataLoader
        if isinstance(data, DataLoader):
            return plain()
        from nextrec.basic import model as nextrec_model  # nextrec is there: this is a nextrec model
        from nextrec_fast.integration.data import column_batch_loader
        with self.fast_sequence_columns():
            tensors = nextrec_model.build_tensors_from_data(data=data, raw_data=data, features=model.all_features,
                                                            target_columns=model.target, id_columns=model.id_columns)
        if tensors is None:
            raise ValueError("No data available to create DataLoader.")
        return column_batch_loader(tensors, batch_size=batch_size, shuffle=shuffle)


V03 = NextrecV03()


class V03Training:
    """Mixed into an accelerated 0.3 model: its data path, batched by whole columns."""

    def _prepare_data_loader(self, data, batch_size: int = 32, shuffle: bool = True):
        options = self._nextrec_fast_options
        plain = lambda: super(V03Training, self)._prepare_data_loader(data, batch_size=batch_size, shuffle=shuffle)  # noqa: E731
        if not options.get("fast_data"):
            return plain()
        return V03.fast_data_loader(self, plain, data, batch_size, shuffle, options)


V03.training_mixin = V03Training