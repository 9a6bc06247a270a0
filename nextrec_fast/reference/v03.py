"""Plain, readable PyTorch re-implementation of nextrec 0.3.1's layers and multi-task models.

This is the oracle of every test and the baseline of every benchmark: it computes what
nextrec computes, the way nextrec computes it (one embedding lookup per feature, a
``[B, L, D]`` sequence tensor pooled with a mask and a batched matmul, a Python loop over
experts and tasks). Module names match nextrec's, so state_dict keys are nextrec's own
(``embedding.embed_dict.<name>.weight``, ``experts.0.mlp.0.weight``, ``gates.0.0.weight``,
``cgc_layers.0.shared_experts.1.mlp.4.bias``, ``prediction_layer.bias``, ...).
No nextrec import: features may be ours or nextrec's (see ``features.feature_kind``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nextrec_fast.activations import activation_layer
from nextrec_fast.compat.nextrec_v03 import dense_input_dim as _dense_input_dim
from nextrec_fast.compat.nextrec_v03 import dense_output_dim as _dense_output_dim
from nextrec_fast.features import DENSE, SEQUENCE, SPARSE, feature_kind

__all__ = [
    "get_initializer",
    "PredictionLayer",
    "EmbeddingLayer",
    "MLP",
    "MultiTaskModel",
    "ESMM",
    "MMOE",
    "CGCLayer",
    "PLE",
]


def get_initializer(init_type: str = "normal", activation: str = "linear", param: dict | None = None):
    """nextrec.utils.initializer.get_initializer."""
    param = param or {}
    try:
        gain = param.get("gain", nn.init.calculate_gain(activation, param.get("param", None)))
    except ValueError:
        gain = 1.0

    def initializer_fn(tensor):
        if init_type == "xavier_uniform":
            nn.init.xavier_uniform_(tensor, gain=gain)
        elif init_type == "xavier_normal":
            nn.init.xavier_normal_(tensor, gain=gain)
        elif init_type == "kaiming_uniform":
            nn.init.kaiming_uniform_(tensor, a=param.get("a", 0), nonlinearity=activation)
        elif init_type == "kaiming_normal":
            nn.init.kaiming_normal_(tensor, a=param.get("a", 0), nonlinearity=activation)
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


class PredictionLayer(nn.Module):
    """Per-task output activation over a bias-shifted ``[B, total_dim]`` logit tensor."""

    def __init__(self, task_type="binary", task_dims=None, use_bias: bool = True, return_logits: bool = False):
        super().__init__()
        self.task_types = [task_type] if isinstance(task_type, str) else list(task_type)
        if not self.task_types:
            raise ValueError("At least one task_type must be specified.")
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
        start = 0
        self._task_slices: list[tuple[int, int]] = []
        for dim in dims:
            if dim < 1:
                raise ValueError("Each task dimension must be >= 1.")
            self._task_slices.append((start, start + dim))
            start += dim
        for task in self.task_types:
            self._get_activation(task)  # fail at construction, not in the first forward
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(self.total_dim))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.shape[-1] != self.total_dim:
            raise ValueError(f"Input last dimension ({x.shape[-1]}) does not match expected total dimension ({self.total_dim}).")
        logits = x if self.bias is None else x + self.bias
        outputs = []
        for task_type, (start, end) in zip(self.task_types, self._task_slices):
            task_logits = logits[..., start:end]
            if self.return_logits:
                outputs.append(task_logits)
            else:
                outputs.append(self._get_activation(task_type)(task_logits))
        result = torch.cat(outputs, dim=-1)
        if result.shape[-1] == 1:
            result = result.squeeze(-1)
        return result

    @staticmethod
    def _get_activation(task_type: str):
        task = task_type.lower()
        if task == "binary":
            return torch.sigmoid
        if task == "regression":
            return lambda x: x
        if task == "multiclass":
            return lambda x: torch.softmax(x, dim=-1)
        raise ValueError(f"Unsupported task_type '{task_type}'.")


class EmbeddingLayer(nn.Module):
    """nextrec's EmbeddingLayer: one ``nn.Embedding`` per embedding_name, one Linear per
    dense feature with ``use_embedding``; sparse/sequence outputs first (feature order),
    dense outputs after them."""

    def __init__(self, features: list):
        super().__init__()
        self.features = list(features)
        self.embed_dict = nn.ModuleDict()
        self.dense_transforms = nn.ModuleDict()
        self.dense_input_dims: dict[str, int] = {}
        for feature in self.features:
            kind = feature_kind(feature)
            if kind in (SPARSE, SEQUENCE):
                if feature.embedding_name in self.embed_dict:
                    continue
                self.embed_dict[feature.embedding_name] = self._make_table(feature)
            else:
                if not feature.use_embedding:
                    self.dense_input_dims[feature.name] = _dense_input_dim(feature)
                    continue
                if feature.name in self.dense_transforms:
                    continue
                linear = nn.Linear(_dense_input_dim(feature), _dense_output_dim(feature), bias=True)
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
                self.dense_transforms[feature.name] = linear
                self.dense_input_dims[feature.name] = _dense_input_dim(feature)
        self.output_dim = self._compute_output_dim()

    @staticmethod
    def _make_table(feature) -> nn.Embedding:
        pretrained = getattr(feature, "pretrained_weight", None)
        if pretrained is not None:
            if pretrained.shape != (feature.vocab_size, feature.embedding_dim):
                raise ValueError(
                    f"Pretrained weight for '{feature.embedding_name}' has shape {tuple(pretrained.shape)}, "
                    f"expected ({feature.vocab_size}, {feature.embedding_dim})."
                )
            freeze = getattr(feature, "freeze_pretrained", False)
            table = nn.Embedding.from_pretrained(pretrained, freeze=freeze, padding_idx=feature.padding_idx)
            table.weight.requires_grad = feature.trainable and not freeze
            return table
        table = nn.Embedding(feature.vocab_size, feature.embedding_dim, padding_idx=feature.padding_idx)
        table.weight.requires_grad = feature.trainable
        get_initializer(feature.init_type, "linear", feature.init_params)(table.weight)
        return table

    def forward(self, x: dict, features: list | None = None, squeeze_dim: bool = True) -> torch.Tensor:
        features = self.features if features is None else features
        sparse_embeds, dense_embeds = [], []
        for feature in features:
            kind = feature_kind(feature)
            if kind == SPARSE:
                table = self.embed_dict[feature.embedding_name]
                sparse_embeds.append(table(x[feature.name].long()).unsqueeze(1))
            elif kind == SEQUENCE:
                seq = x[feature.name].long()
                if feature.max_len is not None and seq.size(1) > feature.max_len:
                    seq = seq[:, -feature.max_len:]  # keep the most recent ids
                seq_emb = self.embed_dict[feature.embedding_name](seq)  # [B, L, D]
                mask_id = feature.padding_idx if feature.padding_idx is not None else 0
                mask = (seq != mask_id).unsqueeze(1).to(seq_emb.dtype)  # [B, 1, L]; nextrec: .float()
                if feature.combiner == "mean":
                    pooled = torch.bmm(mask, seq_emb).squeeze(1) / (mask.sum(dim=-1) + 1e-16)
                elif feature.combiner == "sum":
                    pooled = torch.bmm(mask, seq_emb).squeeze(1)
                elif feature.combiner == "concat":
                    pooled = seq_emb.flatten(start_dim=1, end_dim=2)  # nextrec ignores the mask here
                else:
                    raise ValueError(f"Unknown combiner for {feature.name}: {feature.combiner}")
                sparse_embeds.append(pooled.unsqueeze(1))
            else:
                dense_embeds.append(self._project_dense(feature, x))
        if squeeze_dim:
            pieces = []
            if sparse_embeds:
                pieces.append(torch.cat([e.flatten(start_dim=1) for e in sparse_embeds], dim=1))
            if dense_embeds:
                pieces.append(torch.cat(dense_embeds, dim=1))
            if not pieces:
                raise ValueError("No input features found for EmbeddingLayer.")
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        outputs = list(sparse_embeds) + [e.unsqueeze(1) for e in dense_embeds]
        if not outputs or len({e.shape[-1] for e in outputs}) != 1:
            raise ValueError("squeeze_dim=False requires all embeddings to have the same last dimension.")
        return torch.cat(outputs, dim=1)

    def _project_dense(self, feature, x: dict) -> torch.Tensor:
        if feature.name not in x:
            raise KeyError(f"Dense feature '{feature.name}' is missing from input.")
        # nextrec casts with .float(); casting to the model's dtype is the same for fp32 models
        # and keeps float64 models (our precision tests) in float64.
        value = x[feature.name].to(self._dense_dtype())
        value = value.unsqueeze(-1) if value.dim() == 1 else value.view(value.size(0), -1)
        expected = self.dense_input_dims.get(feature.name, _dense_input_dim(feature))
        if value.shape[1] != expected:
            raise ValueError(f"Dense feature '{feature.name}' expects {expected} inputs but got {value.shape[1]}.")
        if not feature.use_embedding:
            return value
        return self.dense_transforms[feature.name](value)

    def _dense_dtype(self) -> torch.dtype:
        param = next(self.parameters(), None)
        return param.dtype if param is not None and param.is_floating_point() else torch.float32

    def _compute_output_dim(self, features: list | None = None) -> int:
        candidates = list(features) if features is not None else self.features
        unique = {f.name: f for f in candidates}  # nextrec de-duplicates by feature name
        dim = 0
        for feature in unique.values():
            kind = feature_kind(feature)
            if kind == DENSE:
                dim += _dense_output_dim(feature)
            elif kind == SEQUENCE and feature.combiner == "concat":
                dim += feature.embedding_dim * feature.max_len
            else:
                dim += feature.embedding_dim
        return dim

    def get_input_dim(self, features: list | None = None) -> int:
        return self._compute_output_dim(features)

    @property
    def input_dim(self) -> int:
        return self.output_dim


class MLP(nn.Module):
    """Linear → BatchNorm1d → activation → Dropout per hidden layer, optional output Linear."""

    def __init__(self, input_dim: int, output_layer: bool = True, dims: list[int] | None = None,
                 dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        layers = []
        for dim in dims or []:
            layers += [nn.Linear(input_dim, dim), nn.BatchNorm1d(dim), activation_layer(activation), nn.Dropout(p=dropout)]
            input_dim = dim
        if output_layer:
            layers.append(nn.Linear(input_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x)


class MultiTaskModel(nn.Module):
    """What the three models share: nextrec's feature bookkeeping and training-only arguments
    (optimizer, loss, regularisation weights), kept as attributes for a drop-in swap but
    unused by the forward pass."""

    model_name = "MultiTask"

    def _init_common(self, dense_features, sparse_features, sequence_features, target, task, device,
                     training_args: dict):
        self.dense_features = list(dense_features or [])
        self.sparse_features = list(sparse_features or [])
        self.sequence_features = list(sequence_features or [])
        self.all_features = self.dense_features + self.sparse_features + self.sequence_features
        for feature in self.all_features:
            feature_kind(feature)  # a clear TypeError for anything that is not a feature
        self.feature_names = [f.name for f in self.all_features]
        self.target = [target] if isinstance(target, str) else list(target or [])
        self.task = task
        self.nums_task = len(task) if isinstance(task, list) else 1
        self.device = torch.device(device)
        for key, value in training_args.items():
            setattr(self, key, value)

    @property
    def task_type(self):
        return self.task if isinstance(self.task, list) else [self.task]


def _training_args(optimizer, optimizer_params, loss, loss_params, embedding_l1_reg, dense_l1_reg,
                   embedding_l2_reg, dense_l2_reg, kwargs) -> dict:
    return dict(
        optimizer=optimizer, optimizer_params=optimizer_params or {}, loss=loss if loss is not None else "bce",
        loss_params=loss_params, embedding_l1_reg=embedding_l1_reg, dense_l1_reg=dense_l1_reg,
        embedding_l2_reg=embedding_l2_reg, dense_l2_reg=dense_l2_reg, extra_kwargs=dict(kwargs),
    )


class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model: output ``[B, 2]`` = (CTR, CTCVR = CTR * CVR)."""

    model_name = "ESMM"

    def __init__(self, dense_features, sparse_features, sequence_features, ctr_params: dict, cvr_params: dict,
                 target: list[str] = ["ctr", "ctcvr"], task: list[str] = ["binary", "binary"],
                 optimizer="adam", optimizer_params: dict | None = None, loss="bce", loss_params=None,
                 device: str = "cpu", embedding_l1_reg=1e-6, dense_l1_reg=1e-5, embedding_l2_reg=1e-5,
                 dense_l2_reg=1e-4, **kwargs):
        if len(target) != 2:
            raise ValueError(f"ESMM requires exactly 2 targets (ctr and ctcvr), got {len(target)}")
        super().__init__()
        self._init_common(dense_features, sparse_features, sequence_features, target, task, device,
                          _training_args(optimizer, optimizer_params, loss, loss_params, embedding_l1_reg,
                                         dense_l1_reg, embedding_l2_reg, dense_l2_reg, kwargs))
        self.embedding = EmbeddingLayer(self.all_features)
        input_dim = self.embedding.input_dim
        self.ctr_tower = MLP(input_dim=input_dim, output_layer=True, **ctr_params)
        self.cvr_tower = MLP(input_dim=input_dim, output_layer=True, **cvr_params)
        self.prediction_layer = PredictionLayer(task_type=["binary", "binary"], task_dims=[1, 1])

    @property
    def task_type(self):
        return ["binary", "binary"]

    def forward(self, x):
        input_flat = self.embedding(x=x, features=self.all_features, squeeze_dim=True)
        logits = torch.cat([self.ctr_tower(input_flat), self.cvr_tower(input_flat)], dim=1)
        ctr, cvr = self.prediction_layer(logits).chunk(2, dim=1)
        return torch.cat([ctr, ctr * cvr], dim=1)


class MMOE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate and one tower per task."""

    model_name = "MMOE"

    def __init__(self, dense_features=[], sparse_features=[], sequence_features=[], expert_params: dict = {},
                 num_experts: int = 3, tower_params_list: list[dict] = [], target: list[str] = [],
                 task="binary", optimizer="adam", optimizer_params: dict | None = None, loss="bce",
                 loss_params=None, device: str = "cpu", embedding_l1_reg=1e-6, dense_l1_reg=1e-5,
                 embedding_l2_reg=1e-5, dense_l2_reg=1e-4, **kwargs):
        super().__init__()
        self._init_common(dense_features, sparse_features, sequence_features, target, task, device,
                          _training_args(optimizer, optimizer_params, loss, loss_params, embedding_l1_reg,
                                         dense_l1_reg, embedding_l2_reg, dense_l2_reg, kwargs))
        self.num_tasks = len(self.target)
        self.num_experts = num_experts
        if len(tower_params_list) != self.num_tasks:
            raise ValueError(f"Number of tower params ({len(tower_params_list)}) must match number of tasks ({self.num_tasks})")
        self.embedding = EmbeddingLayer(self.all_features)
        input_dim = self.embedding.input_dim
        self.experts = nn.ModuleList(MLP(input_dim=input_dim, output_layer=False, **expert_params) for _ in range(num_experts))
        dims = expert_params.get("dims") or []
        expert_output_dim = dims[-1] if dims else input_dim
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(input_dim, num_experts), nn.Softmax(dim=1)) for _ in range(self.num_tasks)
        )
        self.towers = nn.ModuleList(MLP(input_dim=expert_output_dim, output_layer=True, **p) for p in tower_params_list)
        self.prediction_layer = PredictionLayer(task_type=self.task_type, task_dims=[1] * self.num_tasks)

    def forward(self, x):
        input_flat = self.embedding(x=x, features=self.all_features, squeeze_dim=True)
        expert_outputs = torch.stack([expert(input_flat) for expert in self.experts], dim=0)  # [E, B, D]
        task_outputs = []
        for task_idx in range(self.num_tasks):
            gate_weights = self.gates[task_idx](input_flat).unsqueeze(2)  # [B, E, 1]
            gated = torch.sum(gate_weights * expert_outputs.permute(1, 0, 2), dim=1)  # [B, D]
            task_outputs.append(self.towers[task_idx](gated))
        return self.prediction_layer(torch.cat(task_outputs, dim=1))


class CGCLayer(nn.Module):
    """Customized Gate Control block of PLE: shared and task-specific experts, one gate per task
    (over shared + own specific experts) and a shared gate (over all specific + shared experts)."""

    def __init__(self, input_dim: int, num_tasks: int, num_shared_experts: int, num_specific_experts: int,
                 shared_expert_params: dict, specific_expert_params: dict | list[dict]):
        super().__init__()
        if num_tasks < 1:
            raise ValueError("num_tasks must be >= 1")
        if isinstance(specific_expert_params, list):
            if len(specific_expert_params) != num_tasks:
                raise ValueError(f"Length of specific_expert_params ({len(specific_expert_params)}) must match num_tasks ({num_tasks}).")
            specific_list = [dict(p) for p in specific_expert_params]
        else:
            specific_list = [dict(specific_expert_params) for _ in range(num_tasks)]
        self.output_dim = self._get_output_dim(shared_expert_params, input_dim)
        dims = {self._get_output_dim(p, input_dim) for p in specific_list} | {self.output_dim}
        if len(dims) != 1:
            raise ValueError(f"Shared/specific expert output dims must match, got {dims}")
        self.shared_experts = nn.ModuleList(
            MLP(input_dim=input_dim, output_layer=False, **shared_expert_params) for _ in range(num_shared_experts))
        self.specific_experts = nn.ModuleList(
            nn.ModuleList(MLP(input_dim=input_dim, output_layer=False, **p) for _ in range(num_specific_experts))
            for p in specific_list)
        task_gate_experts = num_shared_experts + num_specific_experts
        self.task_gates = nn.ModuleList(
            nn.Sequential(nn.Linear(input_dim, task_gate_experts), nn.Softmax(dim=1)) for _ in range(num_tasks))
        self.shared_gate = nn.Sequential(
            nn.Linear(input_dim, num_shared_experts + num_specific_experts * num_tasks), nn.Softmax(dim=1))
        self.num_tasks = num_tasks

    @staticmethod
    def _get_output_dim(params: dict, fallback: int) -> int:
        dims = params.get("dims")
        return dims[-1] if dims else fallback

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor):
        if len(task_inputs) != self.num_tasks:
            raise ValueError(f"Expected {self.num_tasks} task inputs, got {len(task_inputs)}")
        shared_outputs = [expert(shared_input) for expert in self.shared_experts]
        shared_stack = torch.stack(shared_outputs, dim=0)  # [S, B, D]
        new_task_fea, all_specific = [], []
        for task_idx in range(self.num_tasks):
            task_input = task_inputs[task_idx]
            specific = [expert(task_input) for expert in self.specific_experts[task_idx]]
            all_specific.extend(specific)
            experts = torch.cat([shared_stack, torch.stack(specific, dim=0)], dim=0).permute(1, 0, 2)
            gate_weights = self.task_gates[task_idx](task_input).unsqueeze(2)
            new_task_fea.append(torch.sum(gate_weights * experts, dim=1))
        all_for_shared = torch.stack(all_specific + shared_outputs, dim=1)  # [B, all, D]
        shared_gate_weights = self.shared_gate(shared_input).unsqueeze(1)
        new_shared = torch.bmm(shared_gate_weights, all_for_shared).squeeze(1)
        return new_task_fea, new_shared


class PLE(MultiTaskModel):
    """Progressive Layered Extraction: ``num_levels`` CGC layers, then one tower per task."""

    model_name = "PLE"

    def __init__(self, dense_features, sparse_features, sequence_features, shared_expert_params: dict,
                 specific_expert_params: dict | list[dict], num_shared_experts: int, num_specific_experts: int,
                 num_levels: int, tower_params_list: list[dict], target: list[str], task="binary",
                 optimizer="adam", optimizer_params: dict | None = None, loss="bce", loss_params=None,
                 device: str = "cpu", embedding_l1_reg=1e-6, dense_l1_reg=1e-5, embedding_l2_reg=1e-5,
                 dense_l2_reg=1e-4, **kwargs):
        super().__init__()
        self._init_common(dense_features, sparse_features, sequence_features, target, task, device,
                          _training_args(optimizer, optimizer_params, loss, loss_params, embedding_l1_reg,
                                         dense_l1_reg, embedding_l2_reg, dense_l2_reg, kwargs))
        self.num_tasks = len(self.target)
        self.num_shared_experts = num_shared_experts
        self.num_specific_experts = num_specific_experts
        self.num_levels = num_levels
        if len(tower_params_list) != self.num_tasks:
            raise ValueError(f"Number of tower params ({len(tower_params_list)}) must match number of tasks ({self.num_tasks})")
        self.embedding = EmbeddingLayer(self.all_features)
        input_dim = self.embedding.input_dim
        dims = shared_expert_params.get("dims") or []
        expert_output_dim = dims[-1] if dims else input_dim
        self.cgc_layers = nn.ModuleList()
        for level in range(num_levels):
            layer = CGCLayer(input_dim if level == 0 else expert_output_dim, self.num_tasks, num_shared_experts,
                             num_specific_experts, shared_expert_params, specific_expert_params)
            self.cgc_layers.append(layer)
            expert_output_dim = layer.output_dim
        self.towers = nn.ModuleList(MLP(input_dim=expert_output_dim, output_layer=True, **p) for p in tower_params_list)
        self.prediction_layer = PredictionLayer(task_type=self.task_type, task_dims=[1] * self.num_tasks)

    def forward(self, x):
        input_flat = self.embedding(x=x, features=self.all_features, squeeze_dim=True)
        task_fea, shared_fea = [input_flat] * self.num_tasks, input_flat
        for layer in self.cgc_layers:
            task_fea, shared_fea = layer(task_fea, shared_fea)
        outputs = [self.towers[t](task_fea[t]) for t in range(self.num_tasks)]
        return self.prediction_layer(torch.cat(outputs, dim=1))
