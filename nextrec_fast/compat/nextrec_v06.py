"""nextrec 0.6.x (the ``engine/`` generation: models return logits, a ``head`` makes them
probabilities in ``call_model``).

Recognised by capability: a model with ``call_model`` and ``head``, ``nums_task``; an
EmbeddingLayer with ``sequence_poolings`` (one pooling module per sequence feature, some with
parameters: ``dot_attention``, ``self_attention``); dense features with ``use_projection``
(a Linear or an MLP in ``dense_transforms``); regularisation in ``embedding_params`` /
``regularization_weights`` with ``embedding_l1_reg``-style weights; GradNorm (``grad_norm``),
which differentiates twice; the data path ``prepare_data_loader`` -> ``RecDataLoader``.
"""
from __future__ import annotations

import torch

from nextrec_fast.compat.base import DenseFeatureSpec, NextrecGeneration, UnsupportedModelError, pooled_spec
from nextrec_fast.features import DENSE, SPARSE, feature_kind

__all__ = ["NextrecV06", "V06"]

# Combiners the one-call pooling op computes exactly as 0.6's AveragePooling / SumPooling /
# ConcatPooling do; every other combiner is pooled by the layer's own module.
_OP_COMBINERS = ("sum", "mean", "concat")


# 0.3's argument names -> 0.6's (model_arguments; reference.v06's errors name them too).
V06_ARGUMENT_NAMES = {"expert_params": "expert_mlp_params", "tower_params_list": "tower_mlp_params_list",
                      "shared_expert_params": "shared_expert_mlp_params", "ctr_params": "ctr_mlp_params",
                      "cvr_params": "cvr_mlp_params"}


def _v06_mlp(params):
    return [_v06_mlp(p) for p in params] if isinstance(params, list) else \
        {("hidden_dims" if k == "dims" else k): v for k, v in params.items()}


class NextrecV06(NextrecGeneration):
    name = "0.6"
    model_packages = ("nextrec.models.multitask.",)
    squeeze_dim_default = False

    def recognises_model(self, model) -> bool:
        return hasattr(model, "call_model") and hasattr(model, "head") and hasattr(model, "nums_task")

    def recognises_layer(self, layer) -> bool:
        return hasattr(layer, "embed_dict") and hasattr(layer, "sequence_poolings")

    def num_tasks(self, model) -> int:
        return int(model.nums_task)

    def multitask_output(self, model, logits):
        return logits  # the head (in call_model) applies the task activations

    def esmm_output(self, model, logits):
        return logits  # [ctr logit, cvr logit]; ESMMAdapter composes ctcvr after the head

    def plain_forward_needed(self, model) -> bool:
        # GradNorm differentiates the task losses' gradients again (create_graph=True).
        return super().plain_forward_needed(model) or (
            getattr(model, "grad_norm", None) is not None and torch.is_grad_enabled())

    def regularization_groups(self, model):
        return [(model.embedding_params, model.embedding_l1_reg, model.embedding_l2_reg),
                (model.regularization_weights, model.dense_l1_reg, model.dense_l2_reg)]

    def embedding_plan(self, layer):
        pooled, dense = [], []
        for feature in layer.features:
            kind = feature_kind(feature)
            if kind == DENSE:
                projection = layer.dense_transforms[feature.name] if feature.use_projection else None
                input_dim = int(layer.dense_input_dims.get(feature.name, feature.input_dim))
                out_dim = int(feature.embedding_dim) if projection is not None else input_dim
                dense.append(DenseFeatureSpec(feature.name, input_dim, out_dim, projection))
            elif kind == SPARSE:
                pooled.append(pooled_spec(feature, kind, "sum", -1, None))
            else:
                combiner = feature.combiner
                mask_id = feature.padding_idx if feature.padding_idx is not None else 0  # InputMask's rule
                module = None
                if combiner not in _OP_COMBINERS:
                    module = layer.sequence_poolings[feature.name] if feature.name in layer.sequence_poolings else None
                    if module is None:
                        raise UnsupportedModelError(f"sequence feature {feature.name!r}: no pooling module for "
                                                    f"combiner {combiner!r}")
                elif combiner == "concat":
                    mask_id = -1  # ConcatPooling keeps padding positions
                pooled.append(pooled_spec(feature, kind, combiner, mask_id, feature.max_len, module))
        return pooled, dense

    sequence_column_function = ("nextrec.data.dataloader", "prepare_sequence_column")

    def sequence_padding(self, feature):
        max_len, pad = feature.max_len if feature.max_len is not None else 0, feature.padding_idx
        return int(max_len), int(pad if pad is not None else 0)

    def fast_data_loader(self, model, plain, data, batch_size, shuffle, options):
        import pandas as pd
        from nextrec.data.dataloader import build_tensors_from_data

        from nextrec_fast.integration.data import column_batch_loader
        extra = options["loader_kwargs"]
        in_memory = isinstance(data, (dict, pd.DataFrame)) or type(data).__module__.startswith("polars")
        if (not in_memory or extra.get("streaming") or extra.get("num_workers") or extra.get("processor") is not None
                or extra.get("expand")):
            return plain()  # files, streaming, workers, processors: nextrec's own loader
        key_columns = extra.get("key_columns")
        with self.fast_sequence_columns():
            tensors = build_tensors_from_data(data=data, raw_data=data, features=model.all_features,
                                              target_columns=model.target_columns,
                                              key_columns=key_columns if key_columns is not None else model.key_columns)
        return column_batch_loader(tensors, batch_size=batch_size, shuffle=shuffle,
                                   sections=("features", "labels", "keys"), constants={"schema": tensors.get("schema")})

    def probabilities(self, model, batch):
        # What fit, evaluate and predict score: call_model (the forward's logits through the head),
        # then the training adapter (ESMM's turns [ctr, cvr] into [ctr, ctcvr]).
        adapter = getattr(model, "training_adapter", None)
        return adapter.forward(model, batch) if adapter is not None else model.call_model(batch)

    def model_arguments(self, kind, kwargs):
        out = {V06_ARGUMENT_NAMES.get(k, k): _v06_mlp(v) if k in V06_ARGUMENT_NAMES else v for k, v in kwargs.items()}
        if "specific_expert_params" in out:  # 0.6: one MLP description per task
            out["specific_expert_mlp_params"] = [_v06_mlp(out.pop("specific_expert_params"))] * len(out["target"])
        out.pop("task", None)  # 0.6 infers the task types from the head
        return out


V06 = NextrecV06()


class V06Training:
    """Mixed into an accelerated 0.6 model: its in-memory data path, batched by whole columns."""

    def prepare_data_loader(self, data, batch_size: int = 32, shuffle: bool = True, **kwargs):
        plain = lambda: super(V06Training, self).prepare_data_loader(data, batch_size=batch_size, shuffle=shuffle,  # noqa: E731
                                                                     **kwargs)
        if not self._nextrec_fast_options.get("fast_data"):
            return plain()
        return V06.fast_data_loader(self, plain, data, batch_size, shuffle, {"loader_kwargs": kwargs})


V06.training_mixin = V06Training
