"""Many structurally identical nextrec MLPs (experts, towers) run as one batched MLP.

The parameters stay where nextrec keeps them (one ``MLP`` module per expert, so state_dict keys,
optimiser state and parameter identity are untouched); each forward gathers them into stacked
tensors (a few MB of copies, negligible beside the GEMMs) and runs:
- the first Linear of all experts that read the same input as ONE matmul over concatenated weights,
- deeper Linears as one batched matmul,
- BatchNorm of all experts at once (per-channel statistics are exactly per-expert BatchNorm's;
  running stats are written back to every expert's buffers), or LayerNorm of all experts at
  once (per expert and row, as each expert's own LayerNorm),
- the activation and dropout once over all experts.
Layout between layers is ``[B, E * N]`` (expert-major columns); results are returned as
``[B, E, N]``. On CUDA (or with the ``triton`` backend) each layer is one fused Triton op
(``nextrec_fast.ops.triton_ops.expert_layer``) working in ``[E, B, N]``; the result is then a
transposed view, so nothing is copied between the layouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nextrec_fast.activations import activation_name
from nextrec_fast.backend import get_backend, use_triton
from nextrec_fast.layers.hooks import needs_module_call
from nextrec_fast.layers.indexing import index_tensor
from nextrec_fast.ops.dense_gemm import gemm_into, onednn_operand, uses_onednn
from nextrec_fast.ops._dispatch import _functorch_transforms_active, create_graph_requested  # torch only


@dataclass
class _Layer:
    linears: list[nn.Linear]
    norms: list[nn.BatchNorm1d] | list[nn.LayerNorm] | None
    acts: list[nn.Module] | None
    dropouts: list[nn.Dropout] | None


def _split_blocks(mlp: nn.Module) -> list[tuple]:
    """An MLP's Sequential as [(Linear, BatchNorm|LayerNorm|None, activation|None, Dropout|None), ...]."""
    seq = mlp.mlp if hasattr(mlp, "mlp") else mlp
    blocks, current = [], None
    for module in seq:
        if isinstance(module, nn.Linear):
            if current is not None:
                blocks.append(tuple(current))
            current = [module, None, None, None]
        elif current is None:
            raise ValueError(f"an MLP must start with nn.Linear, got {type(module).__name__}")
        elif isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)) and current[1] is None and current[2] is None:
            current[1] = module
        elif isinstance(module, nn.Dropout):
            current[3] = module
        elif current[2] is None and current[3] is None:
            current[2] = module
        else:
            raise ValueError(f"unexpected module {type(module).__name__} in an MLP")
    if current is not None:
        blocks.append(tuple(current))
    return blocks


def _module_signature(module: nn.Module | None):
    if module is None:
        return None
    if isinstance(module, nn.BatchNorm1d):
        return ("bn", module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, module.training)
    if isinstance(module, nn.LayerNorm):
        return ("ln", tuple(module.normalized_shape), module.eps, module.weight is not None, module.bias is not None)
    if isinstance(module, nn.Linear):
        return ("linear", module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.PReLU):
        return ("prelu", module.weight.numel())
    if isinstance(module, nn.Dropout):
        return ("dropout", module.p, module.training)
    return (type(module).__name__, module.extra_repr())


def _blocks_signature(blocks: list[tuple]) -> tuple:
    return tuple(tuple(_module_signature(m) for m in block) for block in blocks)


def mlp_signature(mlp: nn.Module) -> tuple:
    """Two MLPs with the same signature can be batched together."""
    return _blocks_signature(_split_blocks(mlp))


class ExpertBank:
    """A plan over E MLP modules with one signature. Holds references, no parameters.

    ``blocks``, ``same_signature``: each MLP's ``_split_blocks`` and that they share one
    signature, when the caller (build_banks, on every forward, so later changes to the modules
    are seen) has already worked them out."""

    def __init__(self, mlps: Sequence[nn.Module], blocks: Sequence[list[tuple]] | None = None,
                 same_signature: bool = False):
        if not mlps:
            raise ValueError("ExpertBank needs at least one MLP")
        per_mlp = list(blocks) if blocks is not None else [_split_blocks(m) for m in mlps]
        if not same_signature and len({_blocks_signature(b) for b in per_mlp}) != 1:
            raise ValueError("ExpertBank: all MLPs must have the same structure; group them with mlp_signature")
        self.mlps = list(mlps)
        self.layers: list[_Layer] = []
        for depth in range(len(per_mlp[0])):
            blocks = [b[depth] for b in per_mlp]
            self.layers.append(_Layer(
                linears=[b[0] for b in blocks],
                norms=[b[1] for b in blocks] if blocks[0][1] is not None else None,
                acts=[b[2] for b in blocks] if blocks[0][2] is not None else None,
                dropouts=[b[3] for b in blocks] if blocks[0][3] is not None else None,
            ))
        self.num_experts = len(mlps)
        last = self.layers[-1].linears[0] if self.layers else None
        self.out_features = last.out_features if last is not None else None

    def forward(self, inputs: Sequence[torch.Tensor] | torch.Tensor, input_of: Sequence[int] | None = None) -> torch.Tensor:
        """Run all experts.

        ``inputs``: a list of ``[B, K]`` tensors with ``input_of[e]`` naming expert e's input
        (None: all read ``inputs[0]``), or a ``[E, B, K]`` tensor, one input per expert.
        Returns ``[B, E, N]`` (possibly a transposed view).
        """
        first = inputs if isinstance(inputs, torch.Tensor) else inputs[0]
        if not self.layers:  # MLP(dims=[], output_layer=False) is the identity
            if isinstance(inputs, torch.Tensor):
                return inputs.transpose(0, 1)
            return torch.stack([inputs[i] for i in (input_of or [0] * self.num_experts)], dim=1)
        if use_triton(first) and self._triton_supported():
            return self._forward_triton(inputs, input_of).transpose(0, 1)
        if self._cpu_op_supported(first):
            return self._forward_cpu_op(inputs, input_of)
        h = self._first_linear(inputs, input_of)
        h = self._post_linear(self.layers[0], h)
        for layer in self.layers[1:]:
            h = self._batched_linear(layer, h)
            h = self._post_linear(layer, h)
        return h.view(h.shape[0], self.num_experts, -1)

    __call__ = forward

    # -- Triton path ----------------------------------------------------------------------
    def _triton_supported(self) -> bool:
        for layer in self.layers:
            if layer.acts is not None and activation_name(layer.acts[0]) is None:
                return False  # a non-default activation module: only the PyTorch path knows it
            if layer.acts is not None and isinstance(layer.acts[0], nn.PReLU) and layer.acts[0].weight.numel() != 1:
                return False
            if layer.linears[0].bias is None:
                return False
            if layer.norms is not None and (_is_layer_norm(layer) or not layer.norms[0].affine):
                return False  # LayerNorm: the batched PyTorch path
        return True

    def _forward_triton(self, inputs, input_of) -> torch.Tensor:
        from nextrec_fast.ops import triton_ops
        index = None
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 3:
            x = inputs
        else:
            input_of = list(input_of) if input_of is not None else [0] * self.num_experts
            distinct = []  # each distinct tensor once: experts reading the same input share its reads
            for i in input_of:
                if not any(inputs[i] is d for d in distinct):
                    distinct.append(inputs[i])
            if len(distinct) == 1:
                x = distinct[0]
            else:
                x = torch.stack(distinct)
                group = [next(g for g, d in enumerate(distinct) if inputs[i] is d) for i in input_of]
                index = index_tensor(group, x.device)
        for layer in self.layers:
            x = self._triton_layer(triton_ops, layer, x, index)
            index = None  # deeper layers: one input per expert
        return x  # [E, B, N]

    @staticmethod
    def _triton_layer(triton_ops, layer: _Layer, x: torch.Tensor, index) -> torch.Tensor:
        weight = torch.stack([lin.weight for lin in layer.linears])
        bias = torch.stack([lin.bias for lin in layer.linears])
        bn = {}
        norms = layer.norms
        update_stats = False
        if norms is not None:
            first = norms[0]
            factor, use_batch_stats, track = _batch_norm_mode(norms, x.shape[-2])
            bn = dict(bn_weight=torch.stack([n.weight for n in norms]), bn_bias=torch.stack([n.bias for n in norms]),
                      bn_eps=first.eps, bn_training=use_batch_stats)
            if not use_batch_stats:
                bn.update(bn_running_mean=torch.stack([n.running_mean for n in norms]),
                          bn_running_var=torch.stack([n.running_var for n in norms]))
            update_stats = track and use_batch_stats
        act = layer.acts[0] if layer.acts is not None else None
        prelu = torch.cat([a.weight for a in layer.acts]) if isinstance(act, nn.PReLU) else None
        drop = layer.dropouts[0] if layer.dropouts is not None else None
        y, mean, var = triton_ops.expert_layer(
            x, weight, bias, input_index=index, activation=activation_name(act) if act is not None else "identity",
            prelu_weight=prelu, dropout_p=drop.p if drop is not None else 0.0,
            training=drop is not None and drop.training, **bn)
        if update_stats:  # from the op's batch statistics; running_var takes the unbiased variance
            batch = x.shape[-2]
            _lerp_running_stats(norms, mean, var * (batch / (batch - 1)), factor)
        return y

    # -- C++ path (CPU): BatchNorm + ReLU as one op, layers chained in the expert-major layout --
    def _cpu_op_supported(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return False
        if get_backend() not in ("auto", "triton") or _batch_norm_act_op() is None:
            return False
        if _cpu_autocast_enabled():
            return False  # the GEMMs run in bfloat16 under autocast: the PyTorch path follows its casts
        # PReLU's per-expert slopes need the batch-major layout, and LayerNorm normalises rows of
        # each expert's block: the PyTorch path handles both.
        return not any((layer.acts is not None and isinstance(layer.acts[0], nn.PReLU)) or _is_layer_norm(layer)
                       for layer in self.layers)

    def _forward_cpu_op(self, inputs, input_of) -> torch.Tensor:
        """Each layer with BatchNorm: a GEMM without bias, then ``batch_norm_act`` (bias, norm,
        ReLU in two passes), which writes ``[E, B, N]`` for the next layer's bmm (no copies) and
        ``[B, E*N]`` after the last one. Layers without a norm whose activation is ReLU or none
        (nextrec 0.6's default MLP), without active dropout: the same with ``bias_act`` (bias and
        ReLU in one pass), instead of a bias copied into the GEMM's output before it runs, a ReLU
        pass, and a transposing copy of the last layer's output for the gates."""
        op = _batch_norm_act_op()
        experts = self.num_experts
        h = None
        for depth, layer in enumerate(self.layers):
            last = depth == len(self.layers) - 1
            act = layer.acts[0] if layer.acts is not None else None
            relu = type(act) is nn.ReLU
            # The op adds the bias: the GEMM runs without it (under batch statistics the mean absorbs
            # it). Without a norm only eagerly (traced, the ReLU stays an op the compiler can fuse)
            # and where there is a bias or a ReLU to apply.
            has_bias = layer.linears[0].bias is not None
            fused = layer.norms is not None or ((relu or (act is None and has_bias)) and not _dropout_active(layer)
                                                and not _tracing())
            if depth == 0:
                # The grouped [G, B, M*N] layout (one bmm over stacked inputs) for BatchNorm layers;
                # without a norm, linear_runs' column blocks (no stacking copy).
                h = self._first_linear_cpu(inputs, input_of, with_bias=not fused, grouped=layer.norms is not None)
            else:
                if h.dim() == 2:  # batch-major after a layer the op did not write: bmm needs [E, B, K]
                    h = h.view(h.shape[0], experts, -1).transpose(0, 1).contiguous()
                if _per_expert_gemms([h], layer.linears):
                    h = _expert_mm(list(h.unbind(0)), layer.linears, with_bias=not fused)
                else:
                    h = self._bmm(layer.linears, h, with_bias=not fused)
            if fused:
                linear_bias = torch.cat([lin.bias for lin in layer.linears]) if has_bias else None
                if layer.norms is not None:
                    h = self._batch_norm_act(op, layer, h, linear_bias, relu=relu, out_expert_major=not last)
                else:
                    h = op.bias_act(h, experts=experts, linear_bias=linear_bias, relu=relu, out_expert_major=not last)
                if relu:
                    act = None
            if act is not None and layer.norms is None:
                h = self._activation(layer.acts, h)  # a fresh GEMM output: ReLU rectifies in place
            elif act is not None:
                h = act(h)  # parameter-free (PReLU takes the PyTorch path): layout does not matter
            if _dropout_active(layer):
                h = F.dropout(h, layer.dropouts[0].p, training=True)
        if h.dim() == 3:
            return h.transpose(0, 1)  # [E, B, N] -> [B, E, N] view
        return h.view(h.shape[0], experts, -1)

    def _first_linear_cpu(self, inputs, input_of, with_bias: bool, grouped: bool) -> torch.Tensor:
        """``[E, B, N]`` from one input per expert (no copy for the next bmm), or without
        autograd at small batches (``_expert_mm``); with ``grouped``, ``[G, B, M*N]`` from G equal
        runs of M experts sharing an input (PLE's upper levels: one bmm, no concatenation); else
        ``[B, E*N]``."""
        linears = self.layers[0].linears
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 3:
            return self._bmm(linears, inputs, with_bias=with_bias)
        input_of = list(input_of) if input_of is not None else [0] * len(linears)
        if _per_expert_gemms([inputs[i] for i in set(input_of)], linears):
            return _expert_mm([inputs[i] for i in input_of], linears, with_bias)
        runs = _shared_input_runs(inputs, input_of, len(linears))
        sizes = {stop - start for start, stop in runs}
        if grouped and len(runs) > 1 and len(sizes) == 1:
            x = torch.stack([inputs[input_of[start]] for start, _ in runs])  # [G, B, K]
            weight = torch.stack([torch.cat([lin.weight for lin in linears[start:stop]]) for start, stop in runs])
            if with_bias and linears[0].bias is not None:
                bias = torch.stack([torch.cat([lin.bias for lin in linears[start:stop]]) for start, stop in runs])
                return expert_bmm(x, weight.transpose(1, 2), bias.unsqueeze(1))
            return expert_bmm(x, weight.transpose(1, 2))
        return self._first_linear(inputs, input_of, with_bias=with_bias)

    @staticmethod
    def _batch_norm_act(op, layer: _Layer, h: torch.Tensor, linear_bias: torch.Tensor | None, relu: bool,
                        out_expert_major: bool) -> torch.Tensor:
        """``act(BatchNorm(h + linear bias))`` over all experts' channels, with nn.BatchNorm1d's
        bookkeeping (batch count, momentum, running statistics)."""
        norms = layer.norms
        first = norms[0]
        batch = h.shape[-2] if h.dim() == 3 else h.shape[0]
        factor, use_batch_stats, track = _batch_norm_mode(norms, batch)
        weight = torch.cat([bn.weight for bn in norms]) if first.affine else None
        bias = torch.cat([bn.bias for bn in norms]) if first.affine else None
        running_mean = running_var = None
        if not use_batch_stats:
            running_mean = torch.cat([bn.running_mean for bn in norms])
            running_var = torch.cat([bn.running_var for bn in norms])
        out, mean_x, var = op.batch_norm_act(
            h, experts=len(norms), linear_bias=linear_bias, weight=weight, bias=bias, running_mean=running_mean,
            running_var=running_var, training=use_batch_stats, eps=first.eps, relu=relu,
            out_expert_major=out_expert_major)
        if track and use_batch_stats:
            # BatchNorm saw x + bias; running_var takes the unbiased variance
            mean = mean_x + linear_bias.detach() if linear_bias is not None else mean_x
            _lerp_running_stats(norms, mean.view(len(norms), -1), var.view(len(norms), -1) * (batch / (batch - 1)),
                                factor)
        return out

    # -- linears ---------------------------------------------------------------------------
    def _first_linear(self, inputs, input_of, with_bias: bool = True) -> torch.Tensor:
        linears = self.layers[0].linears
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 3:
            batch = inputs.shape[1]
            return self._bmm(linears, inputs).transpose(0, 1).reshape(batch, -1)
        input_of = list(input_of) if input_of is not None else [0] * len(linears)
        # Runs of consecutive experts that read the same tensor share one GEMM.
        outputs = []
        for start, stop in _shared_input_runs(inputs, input_of, len(linears)):
            group = linears[start:stop]
            x = inputs[input_of[start]]
            backward = torch.is_grad_enabled() and (x.requires_grad or any(lin.weight.requires_grad for lin in group))
            pad = _k_padding(x, sum(lin.out_features for lin in group), backward=backward)
            weight = torch.cat([lin.weight for lin in group]) if len(group) > 1 else group[0].weight
            if pad:  # the same zero columns on the input and the weights
                x, weight = F.pad(x, (0, pad)), F.pad(weight, (0, pad))
            bias = None
            if group[0].bias is not None and with_bias:
                bias = torch.cat([lin.bias for lin in group]) if len(group) > 1 else group[0].bias
            if (start == 0 and stop == len(linears) and not _tracing()
                    and _reused_output(x, x.shape[0] * weight.shape[0])  # before building the views below
                    and _cpu_gemm_mode(x.unsqueeze(0), weight.t().unsqueeze(0))):
                # One large GEMM for all experts: into a reused buffer (expert_bmm over one "expert").
                out = expert_bmm(x.unsqueeze(0), weight.t().unsqueeze(0), None if bias is None else bias.view(1, 1, -1))
                return out.view(out.shape[1], -1)  # a view, not [0]: select's backward copies into zeros
            outputs.append((x, weight, bias))
        # One GEMM per run of experts sharing an input (several inputs: PLE's upper levels, each
        # task's and the shared experts' own gated input).
        return linear_runs(outputs)

    def _batched_linear(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        linears = layer.linears
        if h.device.type == "cpu" and linears[0].bias is not None and not torch.compiler.is_compiling():
            # On CPU one GEMM per expert on column blocks of [B, E*K] beats bmm, which needs the
            # [E, B, K] layout: two full-size transposing copies per layer and a slower kernel
            # (under bf16 autocast the weight gradient's transposing copy alone took 18 of a
            # 94 ms MMOE step). torch.compile cannot trace out= into strided blocks: it gets the bmm.
            weights, biases = [l.weight for l in linears], [l.bias for l in linears]
            dtype = _cpu_autocast_dtype()
            if dtype is None or h.dtype == torch.float64:  # autocast leaves float64 alone
                return _ExpertBlockLinear.apply(h, len(linears), *weights, *biases)
            # out= skips autocast's casts: make them as autocast's F.linear would (input, weights
            # and bias in its dtype; the casts' backward returns float32 weight gradients).
            with torch.autocast("cpu", enabled=False):
                return _ExpertBlockLinear.apply(h.to(dtype), len(linears), *[w.to(dtype) for w in weights],
                                                *[b.to(dtype) for b in biases])
        batch, experts = h.shape[0], len(linears)
        x = h.view(batch, experts, -1).transpose(0, 1)  # [E, B, K], strided view
        return self._bmm(linears, x).transpose(0, 1).reshape(batch, -1)

    @staticmethod
    def _bmm(linears, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """``[E, B, K] -> [E, B, N]`` with each expert's own weight."""
        if linears[0].weight.shape[0] == 1:
            # [1, K] weights (the towers' last layers) as [K, 1] views: their gradients then come back
            # with the parameters' own strides; through the transposed stack they came as [1, K] with
            # strides (1, 1), which DDP's gradient buckets warn about on every run.
            weight_t = torch.stack([lin.weight.view(-1, 1) for lin in linears])  # [E, K, 1]
        else:
            weight_t = torch.stack([lin.weight for lin in linears]).transpose(1, 2)  # [E, K, N]
        if linears[0].bias is None or not with_bias:
            return expert_bmm(x, weight_t)
        bias = torch.stack([lin.bias for lin in linears]).unsqueeze(1)  # [E, 1, N]
        return expert_bmm(x, weight_t, bias)

    # -- BatchNorm, activation, dropout ------------------------------------------------------
    def _post_linear(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        acts = layer.acts
        if layer.norms is not None and _is_layer_norm(layer):
            h = self._layer_norm(layer.norms, h)
        elif layer.norms is not None and h.dtype == torch.bfloat16 and _bfloat16_op_usable(h, layer.norms):
            # bfloat16 autocast GEMM output: BatchNorm (+ ReLU) as one op reading bfloat16 with the
            # float32 parameters, as nn.BatchNorm1d does there, instead of PyTorch's separate bf16
            # passes. It saves 2-3.5% of a bf16 PLE training step (docs/benchmarks.md; the
            # profiler's ~30% share for those passes overstated what replacing them saves).
            relu = acts is not None and type(acts[0]) is nn.ReLU
            h = self._batch_norm_act(_batch_norm_act_op(), layer, h, None, relu=relu, out_expert_major=False)
            acts = None if relu else acts
        elif layer.norms is not None:
            h = self._batch_norm(layer.norms, h)
        if acts is not None:
            h = self._activation(acts, h)
        if layer.dropouts is not None:
            drop = layer.dropouts[0]
            if drop.p > 0 and drop.training:
                h = F.dropout(h, drop.p, training=True)
        return h

    @staticmethod
    def _batch_norm(norms: list[nn.BatchNorm1d], h: torch.Tensor) -> torch.Tensor:
        """nn.BatchNorm1d.forward over all experts' channels at once."""
        first = norms[0]
        factor, use_batch_stats, track = _batch_norm_mode(norms, h.shape[0])
        running_mean = torch.cat([bn.running_mean for bn in norms]) if track else None
        running_var = torch.cat([bn.running_var for bn in norms]) if track else None
        weight = torch.cat([bn.weight for bn in norms]) if first.affine else None
        bias = torch.cat([bn.bias for bn in norms]) if first.affine else None
        out = F.batch_norm(h, running_mean, running_var, weight, bias, use_batch_stats, factor, first.eps)
        if track and use_batch_stats:
            n = first.num_features
            torch._foreach_copy_([bn.running_mean for bn in norms], list(running_mean.split(n)))
            torch._foreach_copy_([bn.running_var for bn in norms], list(running_var.split(n)))
        return out

    @staticmethod
    def _layer_norm(norms: list[nn.LayerNorm], h: torch.Tensor) -> torch.Tensor:
        """nn.LayerNorm.forward of every expert on its own block of ``[B, E*N]``: one normalisation
        over ``[B, E, N]``, then the experts' affine parameters as ``[E, N]``."""
        first = norms[0]
        batch, experts = h.shape[0], len(norms)
        if first.weight is not None and h.dtype != first.weight.dtype and torch.is_autocast_enabled(h.device.type):
            # nn.LayerNorm under autocast normalises a bfloat16 input and applies its float32 affine
            # in one float32 kernel; normalising in bfloat16 and scaling after (the per-expert
            # weights cannot go into F.layer_norm) rounds the normalised values first, and in
            # narrow layers (2 channels: a gradient ~1e-3 of its terms) the backward's cancellation
            # then gave gradients 10x their size. Normalise in the weights' dtype, as nn.LayerNorm.
            h = h.to(first.weight.dtype)
        out = F.layer_norm(h.view(batch, experts, -1), first.normalized_shape, None, None, first.eps)
        if first.weight is not None:
            weight = torch.stack([n.weight for n in norms])
            out = torch.addcmul(torch.stack([n.bias for n in norms]), out, weight) if first.bias is not None \
                else out * weight
        elif first.bias is not None:
            out = out + torch.stack([n.bias for n in norms])
        return out.reshape(batch, -1)

    @staticmethod
    def _activation(acts: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
        if type(acts[0]) is nn.ReLU:
            # h is always a fresh output of linear / batch_norm, neither of which saves its
            # output for backward: rectify in place, saving a full-size allocation and pass.
            return torch.relu_(h)
        if isinstance(acts[0], nn.PReLU):
            experts = len(acts)
            width = h.shape[1] // experts
            slopes = torch.cat([a.weight.expand(width) if a.weight.numel() == 1 else a.weight for a in acts])
            return F.prelu(h, slopes)
        return acts[0](h)  # parameter-free: the same function for every expert


def _dropout_active(layer: _Layer) -> bool:
    return layer.dropouts is not None and layer.dropouts[0].p > 0 and layer.dropouts[0].training


def _is_layer_norm(layer: _Layer) -> bool:
    return layer.norms is not None and isinstance(layer.norms[0], nn.LayerNorm)


def _batch_norm_mode(norms: list[nn.BatchNorm1d], batch: int) -> tuple[float, bool, bool]:
    """nn.BatchNorm1d.forward's bookkeeping for all ``norms`` at once: counts the batch, and
    returns (momentum factor, whether batch statistics are used, whether running stats exist)."""
    first = norms[0]
    factor = 0.0 if first.momentum is None else first.momentum
    if first.training and first.track_running_stats and first.num_batches_tracked is not None:
        counts = [bn.num_batches_tracked for bn in norms]
        torch._foreach_add_(counts, 1)
        if first.momentum is None:  # cumulative moving average
            factor = 1.0 / float(first.num_batches_tracked)
    use_batch_stats = first.training or first.running_mean is None
    track = first.running_mean is not None and (not first.training or first.track_running_stats)
    if use_batch_stats and batch < 2:
        raise ValueError("BatchNorm in training mode needs more than one sample per batch "
                         f"(got a batch of {batch}). For single-row inference call model.eval(); in training "
                         "(e.g. a last batch of one row in nextrec's fit) pick a batch size that does not leave one "
                         "row, or drop the last batch (DataLoader(drop_last=True))")
    return factor, use_batch_stats, track


# The first layer's input width (26 x 16 pooled + 3 x 16 + 13 dense = 477 in the default config)
# is rarely a multiple of the SIMD width; MKL's fp32 GEMMs of the backward then run slower: at
# B = 2048 and 8 x 256 outputs, dX 29.3 -> 25.2 ms and dW 26.5 -> 23.1 ms with K padded from 477
# to 480 with zero columns (interleaved medians, 2 threads, AVX2), for two 4 MB copies. The zero
# columns add exact zeros; only MKL's blocking, hence the float32 rounding, changes. Batches below
# K_PAD_MIN_BATCH keep the plain GEMM (the copies would outweigh the gain). oneDNN's GEMM
# (ops.dense_gemm) needs no padding: without it the eval forward took 0.91x (ESMM) and 0.98x
# (MMOE) the padded time, forward + backward 0.98x / 1.00x (AMD EPYC, AVX-512, 2 threads).
# The gain is the backward's: without autograd (eval, no_grad) nothing is padded. On an Intel
# Xeon (AVX-512, MKL, 2 threads, batch 2048, interleaved) the eval forward without padding took
# 0.92-0.96x the padded time (ESMM, MMOE, PLE), forward + backward with it 0.98-0.99x the
# unpadded time (PLE; MMOE even).
K_PAD_MULTIPLE = 16
K_PAD_MIN_BATCH = 512


# Without autograd, small batches run one GEMM per expert straight into its block of an
# [E, B, N] output (out=) instead of concatenating or stacking the experts' weights on every
# call: that copy (8 x 256 x 477 floats, 3.9 MB, in the default first layer) costs more than
# the GEMMs at batch 64, and one GEMM per expert is no slower up to batch ~256 (single-thread
# medians: batch 16 0.56 -> 0.33 ms, 64 0.95 -> 0.77, 256 2.53 -> 2.45; at 1024 and more the
# one large GEMM wins). With autograd the concatenation stays (its backward is free views).
PER_EXPERT_GEMM_MAX_BATCH = 256


def _per_expert_gemms(xs: list[torch.Tensor], linears) -> bool:
    """Whether ``_expert_mm`` should run this layer on inputs ``xs`` (see PER_EXPERT_GEMM_MAX_BATCH)."""
    x = xs[0]
    # Tracing first: under torch.compile / export a size test on a symbolic batch becomes a guard.
    if _tracing() or x.device.type != "cpu" or x.shape[-2] > PER_EXPERT_GEMM_MAX_BATCH:
        return False
    if _cpu_autocast_enabled():
        return False  # autocast skips ops given out=: the GEMMs would run in float32, not bfloat16
    weights = [lin.weight for lin in linears] + [lin.bias for lin in linears if lin.bias is not None]
    if any(t.dtype != x.dtype for t in [*xs, *weights]):
        return False  # mixed dtypes: mm(out=) would raise; left to the batched path, as before
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in [*xs, *weights]))


def _expert_mm(inputs: list[torch.Tensor], linears, with_bias: bool) -> torch.Tensor:
    """``[E, B, N]``: expert e's Linear on ``inputs[e]`` (``[B, K]``), without autograd."""
    first = linears[0].weight
    out = torch.empty(len(linears), inputs[0].shape[0], first.shape[0], dtype=inputs[0].dtype,
                      device=inputs[0].device)
    for e, (x, lin) in enumerate(zip(inputs, linears)):
        gemm_into(out[e], x, lin.weight.t(), lin.bias if with_bias else None)
    return out


# PyTorch's CPU bmm runs each batch entry's GEMM on one thread, in parallel over the entries, so
# E experts on T threads take ceil(E / T) single-thread GEMMs: with E % T != 0 some threads
# idle (2 threads, [E, 2048, 256] @ [E, 256, 128]: E = 3 took as long as E = 4, 1.32x one GEMM
# per expert on all threads; E = 5 1.22x, 7 1.15x; E = 2, 4, 6, 8 no difference; at 1 thread
# none). nextrec's per-expert nn.Linear never idles threads this way; with more threads than
# experts (8 experts on 16 cores) bmm would leave half of them idle. Then each expert gets one
# GEMM on all threads instead. Below PER_EXPERT_BMM_MIN_ROWS rows a GEMM is too small to share
# out over threads and bmm stays (2 threads, E = 3: bmm 0.75x the loop's time at 16 rows, equal
# at 64, 1.17x at 128, 1.29x at 1024).
PER_EXPERT_BMM_MIN_ROWS = 128


def _tracing() -> bool:
    """torch.compile, export or the JIT tracer is tracing: no out=, and no size tests (guards)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _cpu_gemm_mode(x: torch.Tensor, weight_t: torch.Tensor) -> str | None:
    """How ``expert_bmm`` runs: ``"per_expert"`` (one GEMM per expert on all threads, see
    PER_EXPERT_BMM_MIN_ROWS), ``"bmm"`` (one bmm into a reused buffer, see
    ``nextrec_fast.ops.reusable_buffer``), both through ``_ExpertBmm``; None: torch's bmm."""
    # Tracing first: out= into slices does not trace (compile, export and the tracer get the bmm),
    # and torch.get_num_threads() would break a fullgraph compile.
    if _tracing():
        return None
    if x.device.type != "cpu" or _cpu_autocast_enabled():
        return None  # out= skips autocast's casts: bmm keeps its bfloat16 GEMMs
    if x.dtype not in (torch.float32, torch.float64) or weight_t.dtype != x.dtype:
        return None
    experts, rows = x.shape[0], x.shape[1]
    if rows >= PER_EXPERT_BMM_MIN_ROWS and experts % _cpu_threads() != 0:
        return "per_expert"
    return "bmm" if _reused_output(x, experts * rows * weight_t.shape[2]) else None


def _reused_output(x: torch.Tensor, numel: int) -> bool:
    """Whether a GEMM output of ``numel`` elements of ``x``'s dtype is worth a reused buffer: on
    CPU, at least ``reusable_buffer.MIN_BYTES``, the extension built. Ask ``_tracing()`` first: a
    size test on a symbolic batch becomes a guard."""
    # The backends torch and reference never touch the extension (importing its module may build it).
    return (x.device.type == "cpu" and get_backend() in ("auto", "triton")
            and numel * x.element_size() >= _reusable_buffers().MIN_BYTES and _reusable_buffers().is_available())


def _cpu_threads() -> int:
    return torch.get_num_threads()


def expert_bmm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.baddbmm(bias, x, weight_t)`` (``torch.bmm`` without ``bias``): ``x`` ``[E, B, K]``,
    ``weight_t`` ``[E, K, N]``, ``bias`` ``[E, 1, N]``; returns ``[E, B, N]``. On CPU, when the
    experts do not divide evenly over the threads, one GEMM per expert on all threads, forward
    and backward, with the same result up to float rounding; large outputs and input gradients
    go into reused buffers (``_cpu_gemm_mode``)."""
    mode = _cpu_gemm_mode(x, weight_t)
    if mode is not None:
        return _ExpertBmm.apply(x, weight_t, bias, mode == "per_expert")
    return torch.bmm(x, weight_t) if bias is None else torch.baddbmm(bias, x, weight_t)


def batched_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(x, y)``, with the output and both gradients in reused CPU buffers when the
    output is large (``_cpu_gemm_mode``'s ``"bmm"``; never one GEMM per batch entry)."""
    if _cpu_gemm_mode(x, y) is not None:
        return _ExpertBmm.apply(x, y, None, False)
    return torch.bmm(x, y)


def _k_padding(x: torch.Tensor, out_features: int, backward: bool = True) -> int:
    """Zero columns to append to the first layer's ``[B, K]`` input (0: none) before its GEMM
    with ``out_features`` outputs: only for MKL, not where ``gemm_into`` sends it to oneDNN, and
    only where a backward will run through the GEMM (``backward``)."""
    if (not backward or torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
            or x.dim() != 2 or x.shape[0] < K_PAD_MIN_BATCH or _cpu_autocast_enabled()):
        return 0
    if uses_onednn(x, x.new_empty(()).expand(x.shape[1], out_features)):  # a [K, N] stand-in, no memory
        return 0
    return (-x.shape[1]) % K_PAD_MULTIPLE


def _shared_input_runs(inputs, input_of: list[int], count: int) -> list[tuple[int, int]]:
    """[(start, stop), ...]: runs of consecutive experts that read the same tensor."""
    runs, start = [], 0
    while start < count:
        stop = start
        while stop < count and inputs[input_of[stop]] is inputs[input_of[start]]:
            stop += 1
        runs.append((start, stop))
        start = stop
    return runs


def _lerp_running_stats(norms: list[nn.BatchNorm1d], mean: torch.Tensor, unbiased_var: torch.Tensor,
                        factor: float) -> None:
    """nn.BatchNorm1d's running-statistics update of every expert (``mean``, ``unbiased_var``: [E, N]).

    Detached rather than under ``torch.no_grad()``: a grad-mode switch inside forward becomes a
    ``wrap_with_set_grad_enabled`` node that ``torch.export.save`` / ``load`` cannot round-trip."""
    mean, unbiased_var = mean.detach(), unbiased_var.detach()
    for e, norm in enumerate(norms):
        norm.running_mean.lerp_(mean[e].to(norm.running_mean.dtype), factor)
        norm.running_var.lerp_(unbiased_var[e].to(norm.running_var.dtype), factor)


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts GEMM inputs to, None when it is off."""
    return torch.get_autocast_dtype("cpu") if _cpu_autocast_enabled() else None  # torch >= 2.4 (pyproject)


def _bfloat16_op_usable(h: torch.Tensor, norms: list[nn.BatchNorm1d]) -> bool:
    """The C++ batch_norm_act op can take this bfloat16 activation: CPU, extension built, the auto
    or triton backend, and float32 BatchNorm tensors (autocast's master weights; a model converted
    with ``.bfloat16()`` has bfloat16 ones, which the op does not take: the PyTorch path runs it)."""
    first = norms[0]
    tensors = [t for t in (first.weight, first.bias, first.running_mean, first.running_var) if t is not None]
    return (h.device.type == "cpu" and all(t.dtype == torch.float32 for t in tensors)
            and get_backend() in ("auto", "triton") and _batch_norm_act_op() is not None)


def _reusable_empty(like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised buffer for ``out=``: from the extension's pool (``reusable_buffer``) unless
    the backend is ``torch`` or ``reference`` (no C++ extension), else ``like.new_empty``."""
    if get_backend() in ("auto", "triton"):
        return _reusable_buffers().reusable_empty(like, shape)
    return like.new_empty(shape)


def _reusable_buffers():
    """The ``reusable_buffer`` op module, imported on first use (as ``_batch_norm_act_op``:
    importing it may build the extension, which ``import nextrec_fast`` must not wait for)."""
    from nextrec_fast.ops import reusable_buffer
    return reusable_buffer


def _batch_norm_act_op():
    """The C++ ``batch_norm_act`` op module, or None when the extension is unavailable."""
    from nextrec_fast.ops import batch_norm_act as op
    return op if op.is_available() else None


class _ExpertBlockLinear(torch.autograd.Function):
    """``y[:, e-th block] = x[:, e-th block] @ W[e].T + b[e]`` for all experts, in the ``[B, E*K]``
    layout: GEMMs on strided column blocks, written straight into the output (and, backward,
    into the input gradient) without copies."""

    @staticmethod
    def forward(ctx, x, experts: int, *params):
        weights, biases = params[:experts], params[experts:]
        out_f, in_f = weights[0].shape
        out = _reusable_empty(x, (x.shape[0], experts * out_f))
        for e in range(experts):
            gemm_into(out[:, e * out_f:(e + 1) * out_f], x[:, e * in_f:(e + 1) * in_f], weights[e].t(), biases[e])
        ctx.save_for_backward(x, *weights)
        ctx.experts = experts
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        experts = ctx.experts
        out_f, in_f = weights[0].shape
        need_x = ctx.needs_input_grad[0]
        if create_graph_requested():  # differentiable ops for double backward (no out=)
            blocks = [grad[:, e * out_f:(e + 1) * out_f] for e in range(experts)]
            inputs = [x[:, e * in_f:(e + 1) * in_f] for e in range(experts)]
            grad_x = torch.cat([g.mm(w) for g, w in zip(blocks, weights)], dim=1) if need_x else None
            grad_w = [g.t().mm(i) if ctx.needs_input_grad[2 + e] else None
                      for e, (g, i) in enumerate(zip(blocks, inputs))]
            grad_b = [g.sum(0) if ctx.needs_input_grad[2 + experts + e] else None for e, g in enumerate(blocks)]
            return (grad_x, None, *grad_w, *grad_b)
        grad_x = _reusable_empty(x, x.shape) if need_x else None
        grad_w, grad_b = [], []
        for e in range(experts):
            g = grad[:, e * out_f:(e + 1) * out_f]
            if need_x and ctx.needs_input_grad[2 + e]:
                g = onednn_operand(g, weights[e])  # one copy of the column block for both GEMMs
            if need_x:
                gemm_into(grad_x[:, e * in_f:(e + 1) * in_f], g, weights[e])
            if ctx.needs_input_grad[2 + e]:
                grad_w.append(g.new_empty(out_f, in_f))
                gemm_into(grad_w[-1], g.t(), x[:, e * in_f:(e + 1) * in_f])
            else:
                grad_w.append(None)
            grad_b.append(g.sum(0) if ctx.needs_input_grad[2 + experts + e] else None)
        return (grad_x, None, *grad_w, *grad_b)


def linear_runs(parts: Sequence[tuple]) -> torch.Tensor:
    """``torch.cat([F.linear(x, weight, bias) for x, weight, bias in parts], dim=1)``: ``x``
    ``[B, K_g]``, ``weight`` ``[N_g, K_g]``, ``bias`` ``[N_g]`` or None; returns ``[B, sum N_g]``.

    On CPU (``_runs_linear_usable``) each GEMM writes its column block of one output through
    ``gemm_into`` (oneDNN for large float32 GEMMs, ``ops.dense_gemm``), forward and backward,
    with no concatenation; F.linear would take MKL and, for several parts, a copy."""
    if _runs_linear_usable(parts):
        xs, weights, biases = zip(*parts)
        return _RunsLinear.apply(len(parts), *xs, *weights, *biases)
    outputs = [F.linear(x, weight, bias) for x, weight, bias in parts]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def linear_parts(parts: Sequence[tuple]) -> list[torch.Tensor]:
    """``[F.linear(x, weight, bias) for x, weight, bias in parts]``, as column views of one
    ``_RunsLinear`` output where ``linear_runs`` would run it (no concatenation either way)."""
    if _runs_linear_usable(parts):
        xs, weights, biases = zip(*parts)
        out = _RunsLinear.apply(len(parts), *xs, *weights, *biases)
        return list(out.split([w.shape[0] for w in weights], dim=1))
    return [F.linear(x, weight, bias) for x, weight, bias in parts]


def _runs_linear_usable(parts: Sequence[tuple]) -> bool:
    """Whether ``_RunsLinear`` can take these (input, weight, bias) parts: CPU, not tracing (out=
    into column blocks does not trace), no autocast (out= skips its casts) or functorch transform
    (no jvp / vmap rule), one float32 / float64 dtype throughout, 2-D inputs of one batch, the
    extension's buffers; and something to gain: a GEMM for oneDNN, or a large concatenation saved."""
    x = parts[0][0]
    if _tracing() or x.device.type != "cpu" or _cpu_autocast_enabled() or _functorch_transforms_active():
        return False
    tensors = [t for part in parts for t in part if t is not None]
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype != x.dtype for t in tensors):
        return False
    if not all(p[0].dim() == 2 and p[0].shape[0] == x.shape[0] for p in parts):
        return False
    if not (get_backend() in ("auto", "triton") and _reusable_buffers().is_available()):
        return False
    return (any(uses_onednn(p[0], p[1].t()) for p in parts)
            or (len(parts) > 1 and _reused_output(x, x.shape[0] * sum(p[1].shape[0] for p in parts))))


class _RunsLinear(torch.autograd.Function):
    """``torch.cat([F.linear(x_g, W_g, b_g) for g in runs], dim=1)``: each run's GEMM written
    into its column block of one ``[B, sum N_g]`` output (``gemm_into``), and in backward each
    input's and weight's gradient from that block, with no concatenation or split copies."""

    @staticmethod
    def forward(ctx, runs: int, *tensors):
        xs, weights, biases = tensors[:runs], tensors[runs:2 * runs], tensors[2 * runs:]
        cols = [0]
        for w in weights:
            cols.append(cols[-1] + w.shape[0])
        out = _reusable_empty(xs[0], (xs[0].shape[0], cols[-1]))
        # A strided input (a gate mixture's [B, G, D] slice) is copied for oneDNN once, here, and
        # the copy kept for the weight gradient (gemm_into would copy it there again). The
        # inputs themselves are saved too: a double backward differentiates through them.
        dense = [onednn_operand(x, w.t()) for x, w in zip(xs, weights)]
        for g in range(runs):
            gemm_into(out[:, cols[g]:cols[g + 1]], dense[g], weights[g].t(), biases[g])
        ctx.save_for_backward(*xs, *weights, *[d if d is not x else None for d, x in zip(dense, xs)])
        ctx.runs, ctx.cols = runs, cols
        return out

    @staticmethod
    def backward(ctx, grad):
        runs, cols = ctx.runs, ctx.cols
        saved = ctx.saved_tensors
        xs, weights, copies = saved[:runs], saved[runs:2 * runs], saved[2 * runs:]
        needs = ctx.needs_input_grad[1:]
        blocks = [grad[:, cols[g]:cols[g + 1]] for g in range(runs)]
        if create_graph_requested():  # differentiable ops for double backward (no out=)
            grad_x = [b.mm(w) if needs[g] else None for g, (b, w) in enumerate(zip(blocks, weights))]
            grad_w = [b.t().mm(x) if needs[runs + g] else None for g, (b, x) in enumerate(zip(blocks, xs))]
        else:
            grad_x, grad_w = [], []
            xs = [x if c is None else c for x, c in zip(xs, copies)]  # the forward's dense copies
            for g, (b, x, w) in enumerate(zip(blocks, xs, weights)):
                if needs[g] or needs[runs + g]:
                    b = blocks[g] = onednn_operand(b, w)  # one copy of the column block for both GEMMs
                grad_x.append(None)
                if needs[g]:
                    # Pooled: a fresh [B, K] buffer is page-faulted in every step (the gates' 3.7 MiB
                    # input gradient took 0.78 ms, its GEMM 0.08 ms).
                    grad_x[-1] = _reusable_empty(x, x.shape)
                    gemm_into(grad_x[-1], b, w)
                grad_w.append(None)
                if needs[runs + g]:
                    grad_w[-1] = w.new_empty(w.shape)
                    gemm_into(grad_w[-1], b.t(), x)
        grad_b = [b.sum(0) if needs[2 * runs + g] else None for g, b in enumerate(blocks)]
        return (None, *grad_x, *grad_w, *grad_b)


class _ExpertBmm(torch.autograd.Function):
    """``expert_bmm`` on CPU with its output and input gradient in reused buffers
    (``reusable_empty``): one bmm, or with ``per_expert`` one ``mm`` per expert written into its
    slice (and, in backward, of the input and weight gradients; the weight gradient then takes
    ``weight_t``'s strides, so the stacked weights' backward hands each parameter a gradient in
    its own layout)."""

    @staticmethod
    def forward(ctx, x, weight_t, bias, per_expert: bool):
        out = _reusable_empty(x, (x.shape[0], x.shape[1], weight_t.shape[2]))
        if per_expert:
            for e in range(x.shape[0]):
                gemm_into(out[e], x[e], weight_t[e], None if bias is None else bias[e])
        else:
            gemm_into(out, x, weight_t, bias)
        ctx.save_for_backward(x, weight_t)
        ctx.per_expert = per_expert
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight_t = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_b = grad.sum(1, keepdim=True) if need_b else None
        if create_graph_requested():  # differentiable ops for double backward
            return (torch.bmm(grad, weight_t.transpose(1, 2)) if need_x else None,
                    torch.bmm(x.transpose(1, 2), grad) if need_w else None, grad_b, None)
        grad_x = _reusable_empty(x, x.shape) if need_x else None
        if not ctx.per_expert:
            if need_x:
                gemm_into(grad_x, grad, weight_t.transpose(1, 2))
            grad_w = None
            if need_w and weight_t.transpose(1, 2).is_contiguous():  # stacked [E, N, K] weights, transposed
                grad_w = grad.new_empty(weight_t.transpose(1, 2).shape)
                gemm_into(grad_w, grad.transpose(1, 2), x)
                grad_w = grad_w.transpose(1, 2)  # in the weights' own layout
            elif need_w:  # an activation (the gates' mixture): as large as x
                grad_w = _reusable_empty(x, weight_t.shape)
                gemm_into(grad_w, x.transpose(1, 2), grad)
            return grad_x, grad_w, grad_b, None
        grad_w = None
        if need_w:
            dense = weight_t.is_contiguous() or weight_t.transpose(1, 2).is_contiguous()
            grad_w = (torch.empty_strided(weight_t.shape, weight_t.stride(), dtype=weight_t.dtype, device=weight_t.device)
                      if dense else torch.empty(weight_t.shape, dtype=weight_t.dtype, device=weight_t.device))
        for e in range(x.shape[0]):
            if need_x:
                gemm_into(grad_x[e], grad[e], weight_t[e].t())
            if need_w:
                gemm_into(grad_w[e], x[e].t(), grad[e])
        return grad_x, grad_w, grad_b, None


def build_banks(mlps: Sequence[nn.Module]) -> list[tuple[int, int, ExpertBank]]:
    """Split a list of MLPs into runs of equal signature: [(start, stop, bank), ...]."""
    mlps = list(mlps)  # slicing an nn.ModuleList builds a new ModuleList (module init + add_module per item)
    banks, start = [], 0
    blocks = [_split_blocks(m) for m in mlps]
    signatures = [_blocks_signature(b) for b in blocks]
    while start < len(mlps):
        stop = start
        while stop < len(mlps) and signatures[stop] == signatures[start]:
            stop += 1
        banks.append((start, stop, ExpertBank(mlps[start:stop], blocks[start:stop], same_signature=True)))
        start = stop
    return banks


def run_experts(mlps: Sequence[nn.Module], inputs, input_of: Sequence[int] | None = None) -> torch.Tensor:
    """All ``mlps`` on their inputs, as few batched banks as their structures allow: ``[B, E, N]``.

    An MLP with a hook or a parametrised weight (``nextrec_fast.layers.hooks``) is called as a
    module instead, on its own, so its hooks fire and its weights are computed as it would; the
    others stay batched."""
    mlps = list(mlps)  # nn.ModuleList slices are new ModuleLists: list slices are free
    stacked = isinstance(inputs, torch.Tensor) and inputs.dim() == 3
    input_of = None if input_of is None else list(input_of)
    called = [needs_module_call(m) for m in mlps]
    outputs, start = [], 0
    while start < len(mlps):
        if called[start]:
            x = inputs[start] if stacked else inputs[input_of[start] if input_of is not None else 0]
            outputs.append(mlps[start](x).unsqueeze(1))
            start += 1
            continue
        stop = start
        while stop < len(mlps) and not called[stop]:
            stop += 1
        for first, last, bank in build_banks(mlps[start:stop]):
            first, last = start + first, start + last
            if stacked:  # the whole stack unsliced: a slice's backward zero-fills a copy
                outputs.append(bank(inputs if (first, last) == (0, inputs.shape[0]) else inputs[first:last]))
            else:
                outputs.append(bank(inputs, None if input_of is None else input_of[first:last]))
        start = stop
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
