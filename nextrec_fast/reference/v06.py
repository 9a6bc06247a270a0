"""Plain, readable PyTorch re-implementation of nextrec 0.6.x's layers and multi-task models
(read from nextrec 0.6.14: ``basic/layers.py``, ``basic/heads.py``, ``engine/model.py``,
``models/multitask/{esmm,mmoe,ple}.py``).

The oracle of the 0.6 tests and the base of ``nextrec_fast.models.standalone_v06``: it computes
what nextrec 0.6 computes, the way it does (one lookup per feature, a ``[B, L, D]`` sequence
tensor pooled by the feature's module with a ``[B, 1, L]`` mask, Python loops over experts and
tasks), and builds its modules in nextrec's order with nextrec's initialisers, so under the same
``torch.manual_seed`` the weights are nextrec's and ``state_dict`` keys are nextrec's
(``embedding.embed_dict.<table>.weight``, ``embedding.sequence_poolings.<feature>.query``,
``experts.0.mlp.0.weight``, ``cgc_layers.0.task_gates.1.0.bias``, ``head.prediction.bias``, ...):
0.6 checkpoints load with ``strict=True``.

What 0.6 models do differently from 0.3.1 (``reference.v03``): ``forward`` returns logits
``[B, T]``; ``call_model(x)`` applies the task head (sigmoid for "binary", identity for
"regression"); ``training_adapter.forward(model, x)`` is what ``fit`` / ``predict`` score (ESMM's
turns head outputs ``[ctr, cvr]`` into ``[ctr, ctcvr]``). No training loop here (no ``fit``): with
nextrec 0.6 installed, ``nextrec_fast.models.v06`` gives nextrec's own classes, accelerated.

No nextrec import: features may be ours (``nextrec_fast.features.v06``) or nextrec 0.6's.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from nextrec_fast.activations import activation_layer
from nextrec_fast.compat.nextrec_v06 import V06_ARGUMENT_NAMES
from nextrec_fast.features import DENSE, SEQUENCE, SPARSE, feature_kind

__all__ = [
    "get_initializer", "PredictionLayer", "TaskHead", "InputMask", "ConcatPooling", "AveragePooling", "SumPooling",
    "DotProductAttentionPooling", "SelfAttentionPooling", "EmbeddingLayer", "MLP", "TrainingAdapter",
    "ESMMAdapter", "MultitaskModel", "ESMM", "MMOE", "CGCLayer", "PLE", "SUPPORTED_TASKS",
]

SUPPORTED_TASKS = ("binary", "regression")  # what the multi-task head computes ("generative" is not a head task)

_NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu", "gelu")


def get_initializer(init_type: str = "normal", activation: str = "linear", param: dict | None = None):
    """nextrec 0.6's ``utils.torch_utils.get_initializer``: ``normal`` is N(mean 0, std 1e-4) unless
    ``param`` says otherwise; xavier / orthogonal gains from ``param["gain"]`` or the activation."""
    param = param or {}
    nonlinearity = activation if activation in _NONLINEARITIES else "linear"
    if "gain" in param:
        gain = param["gain"]
    else:
        try:
            gain = nn.init.calculate_gain(nonlinearity, param.get("param"))
        except ValueError:
            gain = 1.0

    def initializer_fn(tensor):
        if init_type == "xavier_uniform":
            nn.init.xavier_uniform_(tensor, gain=gain)
        elif init_type == "xavier_normal":
            nn.init.xavier_normal_(tensor, gain=gain)
        elif init_type == "kaiming_uniform":
            nn.init.kaiming_uniform_(tensor, a=param.get("a", 0), nonlinearity=nonlinearity)
        elif init_type == "kaiming_normal":
            nn.init.kaiming_normal_(tensor, a=param.get("a", 0), nonlinearity=nonlinearity)
        elif init_type == "orthogonal":
            nn.init.orthogonal_(tensor, gain=gain)
        elif init_type == "normal":
            nn.init.normal_(tensor, mean=param.get("mean", 0.0), std=param.get("std", 0.0001))
        elif init_type == "uniform":
            nn.init.uniform_(tensor, a=param.get("a", -0.05), b=param.get("b", 0.05))
        else:
            raise ValueError(f"Unknown init_type: {init_type}")
        return tensor

    return initializer_fn


# -- head ---------------------------------------------------------------------------------
class PredictionLayer(nn.Module):
    """``[B, total_dim]`` logits plus ``bias``, then per task: sigmoid ("binary") or identity
    ("regression"), or the logits themselves with ``return_logits``. Never squeezes (0.3.1 did)."""

    def __init__(self, task_type="binary", task_dims=None, use_bias: bool = True, return_logits: bool = False):
        super().__init__()
        self.task_types = [task_type] if isinstance(task_type, str) else list(task_type)
        if not self.task_types:
            raise ValueError("At least one task_type must be specified.")
        for task in self.task_types:
            if task not in SUPPORTED_TASKS:  # nextrec fails at the first forward; we fail here
                raise ValueError(f"Unsupported task_type {task!r}; the multi-task head takes {SUPPORTED_TASKS}")
        if task_dims is None:
            dims = [1] * len(self.task_types)
        elif isinstance(task_dims, int):
            dims = [task_dims]
        else:
            dims = list(task_dims)
        if len(dims) not in (1, len(self.task_types)):
            raise ValueError("task_dims must be None, a single int (shared), or a sequence of the same length as task_type.")
        if len(dims) == 1 and len(self.task_types) > 1:
            dims = dims * len(self.task_types)
        self.task_dims = dims
        self.total_dim = sum(dims)
        self.return_logits = return_logits
        start, self.task_slices = 0, []
        for dim in dims:
            if dim < 1:
                raise ValueError("Each task dimension must be >= 1.")
            self.task_slices.append((start, start + dim))
            start += dim
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(self.total_dim))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if not torch.onnx.is_in_onnx_export() and x.shape[-1] != self.total_dim:
            raise ValueError(f"Input last dimension ({x.shape[-1]}) does not match expected total dimension "
                             f"({self.total_dim}).")
        logits = x if self.bias is None else x + self.bias
        outputs = []
        for task_type, (start, end) in zip(self.task_types, self.task_slices):
            task_logits = logits[..., start:end]
            binary = task_type == "binary" and not self.return_logits
            outputs.append(torch.sigmoid(task_logits) if binary else task_logits)
        return torch.cat(outputs, dim=-1)


class TaskHead(nn.Module):
    """0.6's ``TaskHead``: a ``PredictionLayer`` under ``prediction`` (so ``head.prediction.bias``)."""

    def __init__(self, task_type="binary", task_dims=None, use_bias: bool = True, return_logits: bool = False):
        super().__init__()
        self.prediction = PredictionLayer(task_type=task_type, task_dims=task_dims, use_bias=use_bias,
                                          return_logits=return_logits)
        self.task_types = self.prediction.task_types
        self.task_dims = self.prediction.task_dims
        self.task_slices = self.prediction.task_slices
        self.total_dim = self.prediction.total_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction(x)


# -- sequence pooling -------------------------------------------------------------------------
class InputMask(nn.Module):
    """``[B, 1, L]`` float mask: 1 where the id is not the feature's ``padding_idx`` (0 if None)."""

    def forward(self, x: dict, feature, seq_tensor: torch.Tensor | None = None) -> torch.Tensor:
        values = seq_tensor if seq_tensor is not None else x[feature.name]
        values = values.long().view(values.size(0), -1)
        padding_idx = feature.padding_idx if feature.padding_idx is not None else 0
        return (values != padding_idx).unsqueeze(1).float()


class ConcatPooling(nn.Module):
    """``[B, L, D]`` -> ``[B, L * D]``; padding positions kept."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x.flatten(start_dim=1, end_dim=2)


class AveragePooling(nn.Module):
    """Masked mean: ``mask @ x / max(count, 1)`` (an all-padding row pools to 0)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return torch.mean(x, dim=1)
        summed = torch.bmm(mask, x).squeeze(1)
        return summed / mask.sum(dim=-1).float().clamp(min=1.0)


class SumPooling(nn.Module):
    """Masked sum: ``mask @ x``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sum(x, dim=1) if mask is None else torch.bmm(mask, x).squeeze(1)


def _mask_2d(mask: torch.Tensor, who: str) -> torch.Tensor:
    if mask.dim() == 3:
        if mask.size(1) == 1:
            return mask.squeeze(1)
        if mask.size(-1) == 1:
            return mask.squeeze(-1)
        raise ValueError(f"[{who}]: bad mask shape: {mask.shape}")
    if mask.dim() == 2:
        return mask
    raise ValueError(f"[{who}]: bad mask dim: {mask.dim()}")


class DotProductAttentionPooling(nn.Module):
    """Attention over positions with one learnt query ``q`` (``[D]``, xavier-initialised):
    ``softmax(x q / sqrt(D))`` over unmasked positions, then the weighted sum ``[B, D]`` (an
    all-padding row pools to 0)."""

    def __init__(self, embedding_dim: int, scale: bool = True, dropout: float = 0.0):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.query = nn.Parameter(torch.empty(embedding_dim))
        nn.init.xavier_uniform_(self.query.view(1, -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"[DotProductAttentionPooling]: x must be [B,L,D], got {x.shape}")
        D = x.shape[-1]
        if D != self.embedding_dim:
            raise ValueError(f"[DotProductAttentionPooling]: embedding_dim mismatch: {D} vs {self.embedding_dim}")
        scores = (x * self.query.view(1, 1, D)).sum(dim=-1)  # [B, L]
        if self.scale:
            scores = scores / math.sqrt(D)
        if mask is not None:
            scores = scores.masked_fill(~_mask_2d(mask, "DotProductAttentionPooling").to(torch.bool), float("-inf"))
        attn = torch.nan_to_num(self.dropout(torch.softmax(scores, dim=-1)), nan=0.0)
        return torch.bmm(attn.unsqueeze(1), x).squeeze(1)


class SelfAttentionPooling(nn.Module):
    """Multi-head self-attention over the positions (padding as the key padding mask), residual,
    LayerNorm (optional feed-forward block), then ``DotProductAttentionPooling``: ``[B, D]``."""

    def __init__(self, embedding_dim: int, num_heads: int = 2, dropout: float = 0.0, use_residual: bool = True,
                 use_layer_norm: bool = True, use_ffn: bool = False):
        super().__init__()
        if embedding_dim % num_heads != 0:
            raise ValueError(f"[SelfAttentionPooling]: embedding_dim ({embedding_dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        self.embedding_dim = embedding_dim
        self.use_residual = use_residual
        self.use_layer_norm = use_layer_norm
        self.dropout = nn.Dropout(dropout)
        self.mha = nn.MultiheadAttention(embed_dim=embedding_dim, num_heads=num_heads, dropout=dropout,
                                         batch_first=True)
        self.layer_norm_1 = nn.LayerNorm(embedding_dim) if use_layer_norm else None
        self.use_ffn = use_ffn
        if use_ffn:
            self.ffn = nn.Sequential(nn.Linear(embedding_dim, 4 * embedding_dim), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(4 * embedding_dim, embedding_dim))
            self.layer_norm_2 = nn.LayerNorm(embedding_dim) if use_layer_norm else None
        self.pool = DotProductAttentionPooling(embedding_dim=embedding_dim, scale=True, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"[SelfAttentionPooling]: x must be [B,L,D], got {x.shape}")
        if x.shape[-1] != self.embedding_dim:
            raise ValueError(f"[SelfAttentionPooling]: embedding_dim mismatch: {x.shape[-1]} vs {self.embedding_dim}")
        key_padding_mask = None
        if mask is not None:
            key_padding_mask = ~_mask_2d(mask, "SelfAttentionPooling").to(torch.bool)  # True = padding
        attn_out, _ = self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = x + self.dropout(attn_out) if self.use_residual else self.dropout(attn_out)
        if self.layer_norm_1 is not None:
            x = self.layer_norm_1(x)
        if self.use_ffn:
            x = x + self.dropout(self.ffn(x))
            if self.layer_norm_2 is not None:
                x = self.layer_norm_2(x)
        return self.pool(x, mask=mask)


_POOLINGS = {"mean": AveragePooling, "sum": SumPooling, "concat": ConcatPooling}


def _check_v06_feature(feature) -> str:
    """The feature's kind; a TypeError naming the feature for 0.3-style features (which lack
    0.6's fields), with the fix."""
    kind = feature_kind(feature)
    needed = {DENSE: ("use_projection", "projection_type"), SPARSE: ("pretrained_weight", "trainable"),
              SEQUENCE: ("pretrained_weight", "trainable", "combiner", "max_len")}[kind]
    missing = [a for a in needed if not hasattr(feature, a)]
    legacy = [a for a in ("l1_reg", "l2_reg", "use_embedding", "freeze_pretrained") if hasattr(feature, a)]
    if missing or legacy:
        what = f"has no {', '.join(missing)}" if missing else f"has {', '.join(legacy)}"
        raise TypeError(
            f"feature {getattr(feature, 'name', '?')!r} ({type(feature).__name__}) {what}: it is a nextrec 0.3-style "
            "feature. The 0.6 API takes nextrec 0.6's features or nextrec_fast.features.v06's; for 0.3.1's API use "
            "nextrec_fast.models.standalone with nextrec_fast.features")
    return kind


# -- embedding layer --------------------------------------------------------------------------
class EmbeddingLayer(nn.Module):
    """nextrec 0.6's EmbeddingLayer: one ``nn.Embedding`` per ``embedding_name`` (pretrained or
    initialised by the feature's ``init_type``), a Linear or MLP per projected dense feature
    (``dense_transforms``), one pooling module per sequence feature (``sequence_poolings``).

    ``forward(x, features, squeeze_dim=False, sequence_output="pooled")``: ``squeeze_dim=True``
    gives ``[B, sum of widths]`` (sparse/sequence outputs in feature order, then dense ones);
    ``False`` stacks ``[B, F, D]`` (every width equal); ``sequence_output="raw"`` stacks the
    sequences' ``[B, F, L, D]`` lookups unpooled."""

    def __init__(self, features: list):
        super().__init__()
        self.features = list(features)
        self.embed_dict = nn.ModuleDict()
        self.dense_transforms = nn.ModuleDict()
        self.dense_input_dims = {}
        self.sequence_poolings = nn.ModuleDict()
        for feature in self.features:
            kind = _check_v06_feature(feature)
            if kind in (SPARSE, SEQUENCE):
                if feature.embedding_name not in self.embed_dict:
                    self.embed_dict[feature.embedding_name] = self._table(feature)
            else:
                if not feature.use_projection:
                    self.dense_input_dims[feature.name] = max(int(feature.input_dim), 1)
                    continue
                if feature.name in self.dense_transforms:
                    continue
                self.dense_transforms[feature.name] = self._projection(feature)
                self.dense_input_dims[feature.name] = feature.input_dim
            if kind == SEQUENCE and feature.name not in self.sequence_poolings:
                self.sequence_poolings[feature.name] = self._pooling(feature)
        self.output_dim = self.compute_output_dim()

    @staticmethod
    def _table(feature) -> nn.Embedding:
        if feature.pretrained_weight is not None:
            weight = feature.pretrained_weight
            if tuple(weight.shape) != (feature.vocab_size, feature.embedding_dim):
                raise ValueError(f"Pretrained weight for {feature.embedding_name!r} has shape {tuple(weight.shape)}, "
                                 f"expected ({feature.vocab_size}, {feature.embedding_dim}).")
            embedding = nn.Embedding.from_pretrained(embeddings=weight, freeze=not feature.trainable,
                                                     padding_idx=feature.padding_idx)
        else:
            embedding = nn.Embedding(feature.vocab_size, feature.embedding_dim, padding_idx=feature.padding_idx)
            # As nextrec: the initialiser overwrites the whole table, the padding row included.
            get_initializer(init_type=feature.init_type, activation="linear", param=feature.init_params)(embedding.weight)
        embedding.weight.requires_grad = feature.trainable
        return embedding

    @staticmethod
    def _projection(feature) -> nn.Module:
        out_dim = feature.embedding_dim if feature.embedding_dim is not None else feature.input_dim

        def linear(n_in, n_out):
            layer = nn.Linear(n_in, n_out, bias=True)
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
            return layer

        if feature.projection_type != "mlp":
            return linear(feature.input_dim, out_dim)
        layers, prev = [], feature.input_dim
        for hidden in feature.mlp_hidden_dims:
            layers += [linear(prev, hidden), activation_layer(feature.mlp_activation)]
            if feature.mlp_dropout > 0:
                layers.append(nn.Dropout(feature.mlp_dropout))
            prev = hidden
        return nn.Sequential(*layers, linear(prev, out_dim))

    @staticmethod
    def _pooling(feature) -> nn.Module:
        if feature.combiner in _POOLINGS:
            return _POOLINGS[feature.combiner]()
        if feature.combiner == "dot_attention":
            return DotProductAttentionPooling(feature.embedding_dim)
        if feature.combiner == "self_attention":
            if feature.embedding_dim % 4 != 0:
                raise ValueError(f"sequence feature {feature.name!r}: self_attention requires embedding_dim divisible "
                                 f"by 4, got {feature.embedding_dim}.")
            return SelfAttentionPooling(feature.embedding_dim, num_heads=4, dropout=0.0)
        raise ValueError(f"Unknown combiner for {feature.name}: {feature.combiner!r}; nextrec 0.6 has mean, sum, "
                         "concat, dot_attention, self_attention")

    def forward(self, x: dict, features: list, squeeze_dim: bool = False, sequence_output: str = "pooled"):
        sparse_embeds, dense_embeds = [], []
        for feature in features:
            kind = feature_kind(feature)
            if kind == SPARSE:
                ids = x[feature.name].long()
                if ids.dim() > 1:
                    ids = ids.view(ids.size(0), -1)
                    if ids.size(1) != 1:
                        raise ValueError(f"Sparse feature '{feature.name}' expects 1 id per sample, got shape "
                                         f"{tuple(x[feature.name].shape)}.")
                    ids = ids.squeeze(1)
                sparse_embeds.append(self.embed_dict[feature.embedding_name](ids).unsqueeze(1))
            elif kind == SEQUENCE:
                ids = x[feature.name].long()
                if feature.max_len is not None:
                    ids = ids[:, -feature.max_len:]
                seq_emb = self.embed_dict[feature.embedding_name](ids)  # [B, L, D]
                if sequence_output == "raw":
                    if squeeze_dim:
                        raise ValueError("sequence_output='raw' is incompatible with squeeze_dim=True.")
                    sparse_embeds.append(seq_emb.unsqueeze(1))
                else:
                    mask = InputMask()(x, feature, ids)
                    sparse_embeds.append(self.sequence_poolings[feature.name](seq_emb, mask).unsqueeze(1))
            else:
                dense_embeds.append(self.project_dense(feature, x))
        if squeeze_dim:
            pieces = []
            if sparse_embeds:
                pieces.append(torch.cat([e.flatten(start_dim=1) for e in sparse_embeds], dim=1))
            if dense_embeds:
                pieces.append(torch.cat(dense_embeds, dim=1))
            if not pieces:
                raise ValueError("No input features found for EmbeddingLayer.")
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if sequence_output == "raw":
            if dense_embeds:
                raise ValueError("sequence_output='raw' does not support dense features.")
            if not sparse_embeds:
                raise ValueError("No input features found for EmbeddingLayer.")
            lengths = {e.shape[2] for e in sparse_embeds}
            if len(lengths) != 1:
                raise ValueError("sequence_output='raw' requires all sequence features to share the same effective "
                                 f"sequence length. Got lengths {sorted(lengths)}.")
            return torch.cat(sparse_embeds, dim=1)
        outputs = list(sparse_embeds)
        if dense_embeds:
            if outputs:
                width = outputs[0].shape[-1]
                for e in dense_embeds:
                    if e.shape[-1] != width:
                        raise ValueError("squeeze_dim=False requires all dense feature dimensions to match the "
                                         f"embedding dimension of sparse/sequence features ({width}), but got {e.shape[-1]}.")
                outputs += [e.unsqueeze(1) for e in dense_embeds]
            else:
                widths = {e.shape[-1] for e in dense_embeds}
                if len(widths) != 1:
                    raise ValueError("squeeze_dim=False requires all dense features to have identical dimensions when "
                                     f"no sparse/sequence features are present, but got dimensions {widths}.")
                outputs = [e.unsqueeze(1) for e in dense_embeds]
        if not outputs:
            raise ValueError("squeeze_dim=False requires at least one sparse/sequence feature or dense features with "
                             "identical projected dimensions.")
        return torch.cat(outputs, dim=1)

    def project_dense(self, feature, x: dict) -> torch.Tensor:
        if feature.name not in x:
            raise KeyError(f"Dense feature '{feature.name}' is missing from input.")
        value = x[feature.name].float()
        value = value.unsqueeze(-1) if value.dim() == 1 else value.view(value.size(0), -1)
        expected = self.dense_input_dims.get(feature.name, feature.input_dim)
        if not torch.onnx.is_in_onnx_export() and value.shape[1] != expected:
            raise ValueError(f"Dense feature '{feature.name}' expects {expected} inputs but got {value.shape[1]}.")
        return self.dense_transforms[feature.name](value) if feature.use_projection else value

    def compute_output_dim(self, features: list | None = None) -> int:
        unique = OrderedDict((f.name, f) for f in (list(features) if features is not None else self.features))
        dim = 0
        for f in unique.values():
            kind = feature_kind(f)
            if kind == DENSE:
                dim += f.embedding_dim if f.use_projection else f.input_dim
            elif kind == SEQUENCE and f.combiner == "concat":
                dim += f.embedding_dim * f.max_len
            else:
                dim += f.embedding_dim
        return dim

    def get_input_dim(self, features: list | None = None) -> int:
        return self.compute_output_dim(features)

    @property
    def input_dim(self) -> int:
        return self.output_dim


# -- MLP --------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Per hidden layer: Linear -> [BatchNorm1d | LayerNorm | nothing] (``norm_type``) ->
    activation -> Dropout; then a Linear to ``output_dim`` (none when None) and
    ``output_activation``. ``output_dim`` attribute: the output width."""

    def __init__(self, input_dim: int, hidden_dims: list[int] | None = None, output_dim: int | None = 1,
                 dropout: float = 0.0, activation: str = "relu", norm_type: str = "none",
                 output_activation: str = "none"):
        super().__init__()
        layers, current = [], input_dim
        for dim in hidden_dims or []:
            layers.append(nn.Linear(current, dim))
            if norm_type == "batch_norm":
                layers.append(nn.BatchNorm1d(dim))
            elif norm_type == "layer_norm":
                layers.append(nn.LayerNorm(dim))
            elif norm_type != "none":
                raise ValueError(f"Unsupported norm_type: {norm_type!r}; expected 'none', 'batch_norm' or 'layer_norm'")
            layers += [activation_layer(activation), nn.Dropout(p=dropout)]
            current = dim
        if output_dim is not None:
            layers.append(nn.Linear(current, output_dim))
            if output_activation != "none":
                layers.append(activation_layer(output_activation))
            self.output_dim = output_dim
        else:
            self.output_dim = current
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x)


# -- models -----------------------------------------------------------------------------------
class TrainingAdapter:
    """What nextrec 0.6's ``fit`` / ``predict`` score: ``adapt_output(model, model.call_model(x))``."""

    def forward(self, model, x: dict):
        return self.adapt_output(model, model.call_model(x))

    def adapt_output(self, model, model_output):
        return model_output


class ESMMAdapter(TrainingAdapter):
    """ESMM's: head outputs ``[ctr, cvr]`` -> ``[ctr, ctcvr = ctr * cvr]``."""

    def adapt_output(self, model, model_output):
        ctr, cvr = model_output.chunk(2, dim=1)
        return torch.cat([ctr, ctr * cvr], dim=1)


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# nextrec 0.3.1's argument names -> 0.6's, for the error a 0.3 caller gets.
_RENAMED = {**V06_ARGUMENT_NAMES, "specific_expert_params": "specific_expert_mlp_params",
            "num_tasks": "target (one per task)", "optimizer": "nextrec 0.6's compile(optimizer=...)",
            "loss": "nextrec 0.6's compile(loss=...)"}


_MLP_KEYS = ("hidden_dims", "output_dim", "dropout", "activation", "norm_type", "output_activation")


def _check_mlp_params(owner: str, name: str, params) -> None:
    for p in params if isinstance(params, list) else [params]:
        if not isinstance(p, dict):
            raise TypeError(f"{owner}: {name} must be a dict (or a list of dicts) of MLP arguments, got {type(p).__name__}")
        if "dims" in p:
            raise TypeError(f"{owner}: {name} uses 'dims' (nextrec 0.3.1's MLP key); nextrec 0.6 calls it 'hidden_dims'")
        unknown = [k for k in p if k not in _MLP_KEYS]
        if unknown:
            raise TypeError(f"{owner}: {name} has unknown MLP argument(s) {unknown}; nextrec 0.6's MLP takes "
                            f"{', '.join(_MLP_KEYS)}")


_BASE_ARGS = ("key_columns", "training_mode", "sampling_mode", "embedding_l1_reg", "dense_l1_reg", "embedding_l2_reg",
              "dense_l2_reg", "device", "session_id", "semantic_id_features")


def _check_kwargs(owner: str, kwargs: dict) -> None:
    """Before anything else, so a 0.3.1 caller hears the 0.6 name of what it passed."""
    for name in kwargs:
        if name not in _BASE_ARGS:
            hint = f"; nextrec 0.6 calls it {_RENAMED[name]}" if name in _RENAMED else ""
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {name!r}{hint}")


class MultitaskModel(nn.Module):
    """What nextrec 0.6's ``Model`` / ``BaseMultitaskModel`` give the three models without the
    training engine: the feature lists (``all_features`` = dense + sparse + sequence),
    ``target_columns`` / ``key_columns``, ``task`` and ``nums_task``, the regularisation weights
    and the parameters they apply to (``embedding_params``, ``regularization_weights``, as
    ``add_reg_loss`` uses them), the ``head`` and ``call_model``, the ``training_adapter``.

    Raises:
        TypeError: unknown keyword arguments (0.3.1's names say their 0.6 name), 0.3-style features.
        ValueError: ``training_mode`` other than "pointwise" (nextrec's own classes, through
            ``nextrec_fast.models.v06``, have the pairwise / listwise adapters), task types.
    """

    model_name = "Multitask"
    model_family = "multitask"

    def _init_base(self, dense_features=None, sparse_features=None, sequence_features=None, target=None, task=None,
                   key_columns=None, training_mode=None, sampling_mode="explicit", embedding_l1_reg=0.0,
                   dense_l1_reg=0.0, embedding_l2_reg=0.0, dense_l2_reg=0.0, device="cpu", session_id=None,
                   semantic_id_features=None):
        if semantic_id_features:
            raise ValueError(f"{type(self).__name__}: semantic_id_features are not used by the multi-task models")
        self.dense_features = list(dense_features or [])
        self.sparse_features = list(sparse_features or [])
        self.sequence_features = list(sequence_features or [])
        self.semantic_id_features = []
        self.all_features = self.dense_features + self.sparse_features + self.sequence_features
        for feature in self.all_features:
            _check_v06_feature(feature)
        self.feature_names = [f.name for f in self.all_features]
        self.feature_scopes = {f.name: "shared" for f in self.all_features}
        self.target_columns = _as_list(target)
        self.key_columns = _as_list(key_columns)
        self.task = self.default_task if task is None else task
        self.nums_task = len(self.task) if isinstance(self.task, list) else 1
        self.training_mode = training_mode or "pointwise"
        if self.training_mode != "pointwise":
            raise ValueError(f"{type(self).__name__}: training_mode={self.training_mode!r}: the plain-module drop-in is "
                             "pointwise only; nextrec 0.6's own classes (nextrec_fast.models.v06 with nextrec "
                             "installed) have the pairwise / listwise adapters")
        self.sampling_mode = sampling_mode
        tasks = [self.task] if isinstance(self.task, str) else list(self.task)
        bad = [t for t in tasks if t not in SUPPORTED_TASKS]
        if bad:
            raise ValueError(f"{type(self).__name__} received unsupported tasks={bad}. Supported: {list(SUPPORTED_TASKS)}.")
        self.embedding_l1_reg, self.dense_l1_reg = embedding_l1_reg, dense_l1_reg
        self.embedding_l2_reg, self.dense_l2_reg = embedding_l2_reg, dense_l2_reg
        self.regularization_weights, self.embedding_params = [], []
        self.device = torch.device(device)
        self.session_id = session_id
        self.grad_norm = None  # nextrec's GradNorm belongs to its fit
        self.grad_norm_shared_modules = []
        self.training_adapter = self._adapter()
        self.head = TaskHead(task_type=self.task)

    def _check_task_count(self) -> None:
        # nextrec finds a mismatch only when the head meets the logits (call_model); say it here.
        tasks = 1 if isinstance(self.task, str) else len(self.task)
        if tasks != self.nums_task:
            raise ValueError(f"{type(self).__name__}: task has {tasks} entr{'y' if tasks == 1 else 'ies'} but target "
                             f"has {self.nums_task}; give one task type per target")

    @property
    def default_task(self):
        nums_task = getattr(self, "nums_task", None)
        return ["binary"] * nums_task if nums_task else ["binary"]

    def _adapter(self) -> TrainingAdapter:
        return TrainingAdapter()

    def call_model(self, x: dict) -> torch.Tensor:
        """The forward's logits through the task head: ``[B, T]`` probabilities for "binary" tasks."""
        return self.head(self(x))

    def register_regularization_weights(self, embedding_attr: str = "embedding", include_modules=()):
        """nextrec's rule: every table of the embedding layer, and the weight of every Linear in the
        ``include_modules`` (the dense projections included), once each."""
        layer = getattr(self, embedding_attr)
        seen = {id(p) for p in self.embedding_params}
        self.embedding_params += [e.weight for e in layer.embed_dict.values() if id(e.weight) not in seen]
        seen = {id(p) for p in self.regularization_weights}
        for name, module in self.named_modules():
            in_embedding = name == embedding_attr or name.startswith(f"{embedding_attr}.")
            projection = in_embedding and ".dense_transforms." in name
            if (module is self or (in_embedding and not projection) or not isinstance(module, nn.Linear)
                    or (include_modules and not any(inc in name for inc in include_modules))
                    or id(module.weight) in seen):
                continue
            self.regularization_weights.append(module.weight)
            seen.add(id(module.weight))

    def add_reg_loss(self) -> torch.Tensor:
        """nextrec 0.6's regularisation term: ``l1 * sum |w| + l2 * sum w**2`` over the tables
        (embedding weights) and the registered Linear weights (dense weights); 0 by default."""
        loss = torch.tensor(0.0, device=self.device)
        if self.embedding_l1_reg > 0:
            loss += self.embedding_l1_reg * sum(p.abs().sum() for p in self.embedding_params)
        if self.embedding_l2_reg > 0:
            loss += self.embedding_l2_reg * sum((p ** 2).sum() for p in self.embedding_params)
        if self.dense_l1_reg > 0:
            loss += self.dense_l1_reg * sum(p.abs().sum() for p in self.regularization_weights)
        if self.dense_l2_reg > 0:
            loss += self.dense_l2_reg * sum((p ** 2).sum() for p in self.regularization_weights)
        return loss


def _gate(input_dim: int, experts: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_dim, experts), nn.Softmax(dim=1))


class ESMM(MultitaskModel):
    """Entire Space Multi-task Model: ``forward`` -> ``[B, 2]`` (ctr, cvr) logits."""

    model_name = "ESMM"

    @property
    def default_task(self):
        return ["binary", "binary"]

    def __init__(self, dense_features, sparse_features, sequence_features, ctr_mlp_params: dict | None = None,
                 cvr_mlp_params: dict | None = None, task: list[str] | None = None, target: list[str] | None = None,
                 **kwargs):
        _check_kwargs("ESMM", kwargs)
        for name, value in (("ctr_mlp_params", ctr_mlp_params), ("cvr_mlp_params", cvr_mlp_params)):
            if value is None:  # required in nextrec 0.6; optional here only to say this
                raise TypeError(f"ESMM needs {name} (the tower's MLP, e.g. {{'hidden_dims': [64]}})")
        target = target or ["ctr", "ctcvr"]
        if len(target) != 2:
            raise ValueError(f"ESMM requires exactly 2 targets (ctr and ctcvr), got {len(target)}")
        _check_mlp_params("ESMM", "ctr_mlp_params", ctr_mlp_params)
        _check_mlp_params("ESMM", "cvr_mlp_params", cvr_mlp_params)
        super().__init__()
        self.nums_task = 2
        self._init_base(dense_features, sparse_features, sequence_features, target=target, task=task, **kwargs)
        for task_type in self.task:
            if task_type != "binary":
                raise ValueError(f"ESMM task must be binary, got '{task_type}'.")
        self.embedding = EmbeddingLayer(features=self.all_features)
        input_dim = self.embedding.input_dim
        self.ctr_tower = MLP(input_dim=input_dim, output_dim=1, **ctr_mlp_params)
        self.cvr_tower = MLP(input_dim=input_dim, output_dim=1, **cvr_mlp_params)
        self.grad_norm_shared_modules = ["embedding"]
        self.register_regularization_weights("embedding", include_modules=["ctr_tower", "cvr_tower"])

    def _adapter(self) -> TrainingAdapter:
        return ESMMAdapter()

    def forward(self, x):
        flat = self.embedding(x=x, features=self.all_features, squeeze_dim=True)
        return torch.cat([self.ctr_tower(flat), self.cvr_tower(flat)], dim=1)


class MMOE(MultitaskModel):
    """Multi-gate Mixture-of-Experts: ``forward`` -> ``[B, T]`` logits."""

    model_name = "MMOE"

    def __init__(self, dense_features=None, sparse_features=None, sequence_features=None,
                 expert_mlp_params: dict | None = None, num_experts: int = 3,
                 tower_mlp_params_list: list[dict] | None = None, target: list[str] | str | None = None,
                 task=None, **kwargs):
        _check_kwargs("MMOE", kwargs)
        if not target:
            raise ValueError("MMOE needs target: one name per task (and one tower in tower_mlp_params_list each)")
        expert_mlp_params = dict(expert_mlp_params or {})
        tower_mlp_params_list = tower_mlp_params_list or []
        _check_mlp_params("MMOE", "expert_mlp_params", expert_mlp_params)
        _check_mlp_params("MMOE", "tower_mlp_params_list", list(tower_mlp_params_list))
        target = _as_list(target)
        super().__init__()
        self.nums_task = len(target) if target else 1
        self._init_base(dense_features, sparse_features, sequence_features, target=target, task=task, **kwargs)
        self.nums_task = len(target)
        self._check_task_count()
        self.num_experts = num_experts
        if len(tower_mlp_params_list) != self.nums_task:
            raise ValueError(f"Number of tower mlp params ({len(tower_mlp_params_list)}) must match number of tasks "
                             f"({self.nums_task})")
        self.embedding = EmbeddingLayer(features=self.all_features)
        input_dim = self.embedding.input_dim
        expert_mlp_params.pop("output_dim", None)
        self.experts = nn.ModuleList([MLP(input_dim=input_dim, output_dim=None, **expert_mlp_params)
                                      for _ in range(num_experts)])
        hidden = expert_mlp_params.get("hidden_dims") or []
        expert_output_dim = hidden[-1] if hidden else input_dim
        self.gates = nn.ModuleList([_gate(input_dim, num_experts) for _ in range(self.nums_task)])
        self.grad_norm_shared_modules = ["embedding", "experts", "gates"]
        self.towers = nn.ModuleList()
        for params in tower_mlp_params_list:
            params = dict(params)
            params.pop("output_dim", None)
            self.towers.append(MLP(input_dim=expert_output_dim, output_dim=1, **params))
        self.register_regularization_weights("embedding", include_modules=["experts", "gates", "towers"])

    def forward(self, x):
        flat = self.embedding(x=x, features=self.all_features, squeeze_dim=True)
        experts = torch.stack([expert(flat) for expert in self.experts], dim=0).permute(1, 0, 2)  # [B, E, D]
        outputs = []
        for t in range(self.nums_task):
            weights = self.gates[t](flat).unsqueeze(2)  # [B, E, 1]
            outputs.append(self.towers[t](torch.sum(weights * experts, dim=1)))
        return torch.cat(outputs, dim=1)


class CGCLayer(nn.Module):
    """One PLE level: shared experts, ``num_specific_experts`` per task, a softmax gate per task
    (over shared + that task's experts) and a shared gate (over every task's experts, then the
    shared ones)."""

    def __init__(self, input_dim: int, nums_task: int, num_shared_experts: int, num_specific_experts: int,
                 shared_expert_mlp_params: dict, specific_expert_mlp_params: list[dict]):
        super().__init__()
        if nums_task < 1:
            raise ValueError("nums_task must be >= 1")
        if len(specific_expert_mlp_params) != nums_task:
            raise ValueError(f"Length of specific_expert_mlp_params ({len(specific_expert_mlp_params)}) must match "
                             f"number of tasks ({nums_task}).")
        specific = [dict(p) for p in specific_expert_mlp_params]

        def out_dim(params):
            return params["hidden_dims"][-1] if params.get("hidden_dims") else input_dim

        self.output_dim = out_dim(shared_expert_mlp_params)
        dims = {out_dim(p) for p in specific} | {self.output_dim}
        if len(dims) != 1:
            raise ValueError(f"Shared/specific expert output dims must match, got {dims}")
        self.shared_experts = nn.ModuleList([MLP(input_dim=input_dim, output_dim=None, **shared_expert_mlp_params)
                                             for _ in range(num_shared_experts)])
        self.specific_experts = nn.ModuleList(
            nn.ModuleList([MLP(input_dim=input_dim, output_dim=None, **params) for _ in range(num_specific_experts)])
            for params in specific)
        self.task_gates = nn.ModuleList([_gate(input_dim, num_shared_experts + num_specific_experts)
                                         for _ in range(nums_task)])
        self.shared_gate = _gate(input_dim, num_shared_experts + num_specific_experts * nums_task)
        self.nums_task = nums_task

    def forward(self, task_inputs: list, shared_input: torch.Tensor):
        if len(task_inputs) != self.nums_task:
            raise ValueError(f"Expected {self.nums_task} task inputs, got {len(task_inputs)}")
        shared_outputs = [expert(shared_input) for expert in self.shared_experts]
        shared_stack = torch.stack(shared_outputs, dim=0)  # [S, B, D]
        new_task, all_specific = [], []
        for t in range(self.nums_task):
            specific = [expert(task_inputs[t]) for expert in self.specific_experts[t]]
            all_specific += specific
            experts = torch.cat([shared_stack, torch.stack(specific, dim=0)], dim=0).permute(1, 0, 2)  # [B, S+P, D]
            weights = self.task_gates[t](task_inputs[t]).unsqueeze(2)
            new_task.append(torch.sum(weights * experts, dim=1))
        everything = torch.stack(all_specific + shared_outputs, dim=1)  # [B, T*P+S, D]
        new_shared = torch.bmm(self.shared_gate(shared_input).unsqueeze(1), everything).squeeze(1)
        return new_task, new_shared


class PLE(MultitaskModel):
    """Progressive Layered Extraction: ``num_levels`` CGC levels, then one tower per task:
    ``forward`` -> ``[B, T]`` logits."""

    model_name = "PLE"

    def __init__(self, dense_features=None, sparse_features=None, sequence_features=None,
                 shared_expert_mlp_params: dict | None = None, specific_expert_mlp_params: list[dict] | None = None,
                 num_shared_experts: int = 2, num_specific_experts: int = 2, num_levels: int = 2,
                 tower_mlp_params_list: list[dict] | None = None, target: list[str] | None = None, task=None,
                 **kwargs):
        _check_kwargs("PLE", kwargs)
        if specific_expert_mlp_params is None:
            raise ValueError("specific_expert_mlp_params must be a list of dicts, one per task.")
        if target is None:
            raise ValueError("PLE needs target: one name per task")
        shared_expert_mlp_params = shared_expert_mlp_params or {}
        tower_mlp_params_list = tower_mlp_params_list or []
        _check_mlp_params("PLE", "shared_expert_mlp_params", shared_expert_mlp_params)
        _check_mlp_params("PLE", "specific_expert_mlp_params", list(specific_expert_mlp_params))
        _check_mlp_params("PLE", "tower_mlp_params_list", list(tower_mlp_params_list))
        target = _as_list(target)
        super().__init__()
        self.nums_task = len(target)
        self._init_base(dense_features, sparse_features, sequence_features, target=target, task=task, **kwargs)
        self.nums_task = len(target)
        self._check_task_count()
        self.num_shared_experts = num_shared_experts
        self.num_specific_experts = num_specific_experts
        self.num_levels = num_levels
        if len(tower_mlp_params_list) != self.nums_task:
            raise ValueError(f"Number of tower mlp params ({len(tower_mlp_params_list)}) must match number of tasks "
                             f"({self.nums_task})")
        self.embedding = EmbeddingLayer(features=self.all_features)
        input_dim = self.embedding.input_dim
        hidden = shared_expert_mlp_params.get("hidden_dims") or []
        expert_output_dim = hidden[-1] if hidden else input_dim
        self.cgc_layers = nn.ModuleList()
        for level in range(num_levels):
            layer = CGCLayer(input_dim if level == 0 else expert_output_dim, self.nums_task, num_shared_experts,
                             num_specific_experts, shared_expert_mlp_params, specific_expert_mlp_params)
            self.cgc_layers.append(layer)
            expert_output_dim = layer.output_dim
        self.grad_norm_shared_modules = ["embedding", "cgc_layers"]
        self.towers = nn.ModuleList([MLP(input_dim=expert_output_dim, output_dim=1, **params)
                                     for params in tower_mlp_params_list])
        self.register_regularization_weights("embedding", include_modules=["cgc_layers", "towers"])

    def forward(self, x):
        flat = self.embedding(x=x, features=self.all_features, squeeze_dim=True)
        task_inputs, shared_input = [flat] * self.nums_task, flat
        for layer in self.cgc_layers:
            task_inputs, shared_input = layer(task_inputs, shared_input)
        return torch.cat([self.towers[t](task_inputs[t]) for t in range(self.nums_task)], dim=1)
