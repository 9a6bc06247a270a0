"""Triton expert-layer and gate-mixture kernels as custom torch ops (``nextrec_fast::*``).

Public API:
- ``expert_layer``: y[e] = dropout(act(BN(x[g(e)] @ weight[e].T + bias[e]))) for E experts at
  once (nextrec's MLP hidden layer: Linear -> BatchNorm1d -> activation -> Dropout);
- ``gate_mixture``: out[t, b] = sum_s softmax(logits[t, b])[s] * experts[index[t, s], b];
- ``is_available(device)``, ``get_backend()`` / ``set_backend(name)``.

Each public function is a thin validating wrapper around an opaque ``torch.library.custom_op``
pair (``*_fwd`` / ``*_bwd``) with fake (meta) kernels and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces through without graph breaks and profiler traces
show the op names. Triton is imported lazily: this module imports (and the ops register) on
machines without Triton; calling the ops there raises.
"""
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "BACKENDS", "expert_layer", "gate_mixture", "get_backend", "is_available", "set_backend",
]

# ---------------------------------------------------------------------------------------------
# Backend switch (consulted by the fast models)
# ---------------------------------------------------------------------------------------------
from nextrec_fast.backend import BACKENDS, get_backend, set_backend  # noqa: E402,F401  (one switch for the package)
from nextrec_fast.ops._dispatch import create_graph_requested, grads_with_graph, reject_tangents  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Availability and lazy kernel import
# ---------------------------------------------------------------------------------------------
_kernel_modules = None


def _kernels():
    """Import the Triton kernels on first use: triton.jit reads TRITON_INTERPRET at import."""
    global _kernel_modules
    if _kernel_modules is None:
        from nextrec_fast.kernels import activations, batchnorm, expert_linear, gate_mixture, utils

        class _Modules:
            pass

        mods = _Modules()
        mods.activations, mods.batchnorm, mods.expert_linear = activations, batchnorm, expert_linear
        mods.gate_mixture, mods.utils = gate_mixture, utils
        _kernel_modules = mods
    return _kernel_modules


@torch.compiler.assume_constant_result
def _activation_id(name: str) -> int:
    # A compile-time constant: torch.compile must not trace the lazy kernel import.
    return int(_kernels().activations.activation_id(name))


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_available(device) -> bool:
    """True for CUDA devices/tensors when Triton is importable, and for CPU ones when Triton runs
    in interpreter mode (TRITON_INTERPRET=1, set before the kernels were first imported)."""
    if isinstance(device, Tensor):
        device = device.device
    device = torch.device(device)
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False
        return _kernel_modules is None or _kernel_modules.utils.INTERPRET
    return False


def _require_available(t: Tensor) -> None:
    if not is_available(t.device):
        raise RuntimeError(
            f"nextrec_fast Triton kernels are not usable on {t.device}: they need a CUDA device with "
            "triton installed, or TRITON_INTERPRET=1 (set before import) for CPU tensors; use the "
            "'torch' backend instead")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Placeholder for an output that is not computed (custom ops cannot return None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _check_index_range(index: Tensor, upper: int, what: str) -> None:
    """Out-of-range indices would read out of bounds in the kernels. On CUDA the check is
    asynchronous (no host sync); it runs inside the op so compiled graphs keep it."""
    if index.numel() == 0:
        return
    if index.device.type == "cpu":
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{what} values must be in [0, {upper}), got range [{lo}, {hi}]")
    else:
        torch._assert_async(((index >= 0) & (index < upper)).all(), f"{what} values must be in [0, {upper})")


# ---------------------------------------------------------------------------------------------
# expert_layer ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("nextrec_fast::expert_layer_fwd", mutates_args=())
def _expert_layer_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, input_index: Optional[Tensor],
    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    bn_running_mean: Optional[Tensor], bn_running_var: Optional[Tensor],
    prelu_weight: Optional[Tensor], seed: Optional[Tensor],
    bn_eps: float, bn_training: bool, activation: int, dropout_p: float, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y [E, B, N], z [E, B, N] pre-BatchNorm linear output or empty, batch mean [E, N]
    or empty, biased batch var [E, N] or empty). z is produced when saved for backward and always
    in train-mode BatchNorm (the normalisation pass reads it). `seed` is None without dropout."""
    _require_available(x)
    k = _kernels()
    if input_index is not None:
        _check_index_range(input_index, x.shape[0], "input_index")
    bias = bias.contiguous()
    prelu_weight = prelu_weight.contiguous() if prelu_weight is not None else None
    stat = _stats_dtype(x.dtype)
    batch = x.shape[-2]
    if bn_weight is not None and bn_training:
        _, z, part_mean, part_m2 = k.expert_linear.expert_linear_forward(
            x, weight, bias, input_index, write_y=False, write_z=True, write_stats=True)
        mean, var = k.batchnorm.combine_block_stats(part_mean, part_m2, batch, k.expert_linear.STATS_BLOCK_M)
        scale = bn_weight.to(stat) * torch.rsqrt(var + bn_eps)
        y = k.batchnorm.normalize_activate(
            z, mean, scale.contiguous(), bn_bias.to(stat).contiguous(), prelu_weight=prelu_weight, seed=seed,
            activation=activation, dropout_p=dropout_p)
        return y, z, mean, var
    fold = {}
    if bn_weight is not None:
        # Eval BatchNorm folded into the GEMM epilogue: ((acc + bias - mean) * scale + beta).
        scale = bn_weight.to(stat) * torch.rsqrt(bn_running_var.to(stat) + bn_eps)
        fold = dict(bn_center=(bias.to(stat) - bn_running_mean.to(stat)).contiguous(),
                    bn_scale=scale.contiguous(), bn_shift=bn_bias.to(stat).contiguous())
    y, z, _, _ = k.expert_linear.expert_linear_forward(
        x, weight, bias, input_index, prelu_weight=prelu_weight, seed=seed, activation=activation,
        dropout_p=dropout_p, write_y=True, write_z=save_for_backward, **fold)
    return y, (z if z is not None else _empty(x)), _empty(x, stat), _empty(x, stat)


@_expert_layer_fwd.register_fake
def _expert_layer_fwd_fake(x, weight, bias, input_index, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                           prelu_weight, seed, bn_eps, bn_training, activation, dropout_p, save_for_backward):
    E, N, _ = weight.shape
    B = x.shape[-2]
    stat = _stats_dtype(x.dtype)
    y = x.new_empty((E, B, N))
    if bn_weight is not None and bn_training:
        return y, x.new_empty((E, B, N)), x.new_empty((E, N), dtype=stat), x.new_empty((E, N), dtype=stat)
    z = x.new_empty((E, B, N)) if save_for_backward else _empty(x)
    return y, z, _empty(x, stat), _empty(x, stat)


@torch.library.custom_op("nextrec_fast::expert_layer_bwd", mutates_args=())
def _expert_layer_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, z: Tensor, input_index: Optional[Tensor],
    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
    prelu_weight: Optional[Tensor], seed: Optional[Tensor],
    bn_eps: float, bn_training: bool, activation: int, dropout_p: float, need_x: bool, need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias, dbn_weight, dbn_bias, dprelu_weight); empty when not
    computed. bn_mean / bn_var are the batch stats (train) or the running stats (eval)."""
    _require_available(grad_y)
    k = _kernels()
    stat = _stats_dtype(x.dtype)
    has_bn = bn_weight is not None
    bn_args = {}
    if has_bn:
        bn_args = dict(center=bn_mean.to(stat).contiguous(),
                       invstd=torch.rsqrt(bn_var.to(stat) + bn_eps).contiguous(),
                       gamma=bn_weight.to(stat).contiguous(), beta=bn_bias.to(stat).contiguous())
    is_prelu = activation == k.activations.PRELU.value
    dz, dbias, dgamma, dbeta, dprelu = k.batchnorm.bn_activation_backward(
        grad_y.contiguous(), z, bn_training=bn_training, prelu_weight=prelu_weight if is_prelu else None, seed=seed,
        activation=activation, dropout_p=dropout_p, **bn_args)
    E, N, K = weight.shape
    batch = x.shape[-2]
    dx = dw = _empty(x)
    if need_x:
        if x.dim() == 2:
            dx = k.expert_linear.expert_linear_backward_input(dz, weight, 1, batch, K, mode=0, dtype=x.dtype)
        elif input_index is None:
            dx = k.expert_linear.expert_linear_backward_input(dz, weight, E, batch, K, mode=1, dtype=x.dtype)
        else:
            groups = x.shape[0]
            order = torch.argsort(input_index, stable=True).to(torch.int32)
            group_start = torch.zeros(groups + 1, dtype=torch.int32, device=x.device)
            group_start[1:] = torch.cumsum(torch.bincount(input_index, minlength=groups), 0)
            dx = k.expert_linear.expert_linear_backward_input(
                dz, weight, groups, batch, K, mode=2, group_start=group_start, group_experts=order, dtype=x.dtype)
    if need_weight:
        dw = k.expert_linear.expert_linear_backward_weight(dz, x, input_index, weight_dtype=weight.dtype)
    dbias = dbias.to(weight.dtype)
    dgamma = dgamma.to(bn_weight.dtype) if has_bn else _empty(x)
    dbeta = dbeta.to(bn_bias.dtype) if has_bn else _empty(x)
    if prelu_weight is None:
        dprelu = _empty(x)
    elif dprelu is None:  # a slope that the activation does not use
        dprelu = torch.zeros_like(prelu_weight)
    else:
        dprelu = dprelu.to(prelu_weight.dtype)
    return dx, dw, dbias, dgamma, dbeta, dprelu


@_expert_layer_bwd.register_fake
def _expert_layer_bwd_fake(grad_y, x, weight, z, input_index, bn_weight, bn_bias, bn_mean, bn_var, prelu_weight,
                           seed, bn_eps, bn_training, activation, dropout_p, need_x, need_weight):
    E, N, K = weight.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else _empty(x)
    dw = weight.new_empty((E, N, K)) if need_weight else _empty(x)
    dbias = weight.new_empty((E, N))
    dgamma = bn_weight.new_empty((E, N)) if bn_weight is not None else _empty(x)
    dbeta = bn_bias.new_empty((E, N)) if bn_bias is not None else _empty(x)
    dprelu = torch.empty_like(prelu_weight) if prelu_weight is not None else _empty(x)
    return dx, dw, dbias, dgamma, dbeta, dprelu


def _expert_layer_setup_context(ctx, inputs, output):
    (x, weight, bias, input_index, bn_weight, bn_bias, running_mean, running_var, prelu_weight, seed,
     bn_eps, bn_training, activation, dropout_p, save_for_backward) = inputs
    _, z, batch_mean, batch_var = output
    train_bn = bn_weight is not None and bn_training
    ctx.saved_z = save_for_backward or train_bn
    bn_mean, bn_var = (batch_mean, batch_var) if train_bn else (running_mean, running_var)
    ctx.save_for_backward(x, weight, z, input_index, bn_weight, bn_bias, bn_mean, bn_var, prelu_weight, seed)
    ctx.options = (bn_eps, bn_training, activation, dropout_p)
    # z and the batch statistics are for the backward pass and the caller's running-stat update.
    ctx.mark_non_differentiable(z, batch_mean, batch_var)


def _expert_layer_backward(ctx, grad_y, grad_z, grad_mean, grad_var):
    if not ctx.saved_z:
        raise RuntimeError("expert_layer_fwd was called with save_for_backward=False")
    if create_graph_requested():
        # The kernel's backward has no derivative, and its dropout mask
        # (drawn in the kernel) cannot be redrawn in PyTorch ops to form one.
        raise NotImplementedError(
            "nextrec_fast::expert_layer_fwd (Triton): double backward (create_graph=True) is not supported; "
            "run that step under nextrec_fast.use_backend('torch')")
    x, weight, z, input_index, bn_weight, bn_bias, bn_mean, bn_var, prelu_weight, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dw, db, dgamma, dbeta, dprelu = torch.ops.nextrec_fast.expert_layer_bwd(
        grad_y, x, weight, z, input_index, bn_weight, bn_bias, bn_mean, bn_var, prelu_weight, seed,
        *ctx.options, needs[0], needs[1])
    return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, None,
            dgamma if needs[4] else None, dbeta if needs[5] else None, None, None,
            dprelu if needs[8] else None, None, None, None, None, None, None)


torch.library.register_autograd(
    "nextrec_fast::expert_layer_fwd", _expert_layer_backward, setup_context=_expert_layer_setup_context)


# ---------------------------------------------------------------------------------------------
# gate_mixture ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("nextrec_fast::gate_mixture_fwd", mutates_args=())
def _gate_mixture_fwd(logits: Tensor, experts: Tensor, expert_index: Optional[Tensor]) -> Tensor:
    _require_available(experts)
    if expert_index is not None:
        _check_index_range(expert_index, experts.shape[0], "expert_index")
        expert_index = expert_index.contiguous()
    return _kernels().gate_mixture.gate_mixture_forward(logits.contiguous(), experts.contiguous(), expert_index)


@_gate_mixture_fwd.register_fake
def _gate_mixture_fwd_fake(logits, experts, expert_index):
    return experts.new_empty((logits.shape[0], logits.shape[1], experts.shape[2]))


@torch.library.custom_op("nextrec_fast::gate_mixture_bwd", mutates_args=())
def _gate_mixture_bwd(grad_out: Tensor, logits: Tensor, experts: Tensor, expert_index: Optional[Tensor],
                      need_logits: bool, need_experts: bool) -> tuple[Tensor, Tensor]:
    _require_available(experts)
    d_logits, d_experts = _kernels().gate_mixture.gate_mixture_backward(
        grad_out.contiguous(), logits.contiguous(), experts.contiguous(),
        expert_index.contiguous() if expert_index is not None else None,
        need_logits=need_logits, need_experts=need_experts)
    return (d_logits if d_logits is not None else _empty(logits),
            d_experts if d_experts is not None else _empty(experts))


@_gate_mixture_bwd.register_fake
def _gate_mixture_bwd_fake(grad_out, logits, experts, expert_index, need_logits, need_experts):
    return (logits.new_empty(logits.shape) if need_logits else _empty(logits),
            experts.new_empty(experts.shape) if need_experts else _empty(experts))


def _gate_mixture_setup_context(ctx, inputs, output):
    logits, experts, expert_index = inputs
    ctx.save_for_backward(logits, experts, expert_index)


def _gate_mixture_backward(ctx, grad_out):
    logits, experts, expert_index = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if create_graph_requested():
        # Autograd over the same mixture in PyTorch ops gives a derivative that can be
        # differentiated again.
        out = reference_gate_mixture(logits, experts, expert_index)
        return (*grads_with_graph(out, (logits, experts), needs[:2], grad_out), None)
    d_logits, d_experts = torch.ops.nextrec_fast.gate_mixture_bwd(
        grad_out, logits, experts, expert_index, needs[0], needs[1])
    return d_logits if needs[0] else None, d_experts if needs[1] else None, None


torch.library.register_autograd(
    "nextrec_fast::gate_mixture_fwd", _gate_mixture_backward, setup_context=_gate_mixture_setup_context)


def reference_gate_mixture(logits: Tensor, experts: Tensor, expert_index: Optional[Tensor] = None) -> Tensor:
    """:func:`gate_mixture` in PyTorch ops (differentiable to any order): ``[T, B, D]`` in the
    experts' dtype, computed in float32 at least (as the kernel accumulates)."""
    compute = torch.promote_types(experts.dtype, torch.float32)
    if expert_index is None:
        chosen = experts.unsqueeze(0).expand(logits.shape[0], -1, -1, -1)  # [T, S, B, D]
    else:
        chosen = experts[expert_index.long()]  # [T, S, B, D]
    out = torch.einsum("tbs,tsbd->tbd", logits.to(compute).softmax(-1), chosen.to(compute))
    return out.to(experts.dtype)


# ---------------------------------------------------------------------------------------------
# Public functions: validation with clear errors, then the ops
# ---------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, dims: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (same as the input)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same as the input)")
    return t


def _check_shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_float_input(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_index(name: str, t, shape: tuple, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    _check_shape(name, t, shape)
    return t


def expert_layer(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    input_index: Optional[Tensor] = None,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    bn_running_mean: Optional[Tensor] = None,
    bn_running_var: Optional[Tensor] = None,
    bn_eps: float = 1e-5,
    bn_training: bool = False,
    activation: str = "relu",
    prelu_weight: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """y[e] = dropout(act(BN(x[g(e)] @ weight[e].T + bias[e]))), shape [E, B, N].

    x: [B, K] shared by every expert, or [G, B, K] with input_index [E] (expert e reads
    x[input_index[e]]) or, without it, G == E one-to-one. weight [E, N, K], bias [E, N] (stacked
    nn.Linear). BatchNorm (channel = (expert, n)) is applied iff bn_weight is given: with batch
    statistics (biased var) when bn_training, else with the running stats. activation is a
    nextrec 0.3.1 MLP activation name; prelu needs prelu_weight [E] (one slope per expert).
    Dropout (inverted, Philox; seed drawn from torch's generator) is active iff training and
    dropout_p > 0.

    Returns (y, batch_mean [E, N], batch_var [E, N]) when bn_training (stats in fp32, fp64 for
    fp64 inputs; non-differentiable): the caller updates the running stats, e.g.
    running_var.lerp_(var * B / (B - 1), momentum). Otherwise (y, None, None).
    """
    _check_float_input("x", x)
    dtype, device = x.dtype, x.device
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [B, K] or [G, B, K], got shape {tuple(x.shape)}")
    _check_tensor("weight", weight, 3, dtype, device)
    E, N, K = weight.shape
    B = x.shape[-2]
    if min(E, N, K, B) < 1:
        raise ValueError(f"empty sizes are not supported: E={E}, N={N}, K={K}, B={B}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects K={K} (weight is [E, N, K])")
    _check_tensor("bias", bias, 2, dtype, device)
    _check_shape("bias", bias, (E, N))
    if input_index is not None:
        if x.dim() != 3:
            raise ValueError("input_index needs a 3-D x [G, B, K]")
        _check_index("input_index", input_index, (E,), device)
    elif x.dim() == 3 and x.shape[0] != E:
        raise ValueError(f"x is [G={x.shape[0]}, B, K] but there are E={E} experts: pass input_index [E]")

    act = _activation_id(activation)
    is_prelu = act == _activation_id("prelu")
    if is_prelu:
        if prelu_weight is None:
            raise ValueError("activation 'prelu' needs prelu_weight [E] (one slope per expert)")
        _check_tensor("prelu_weight", prelu_weight, 1, dtype, device)
        _check_shape("prelu_weight", prelu_weight, (E,))
    else:
        prelu_weight = None

    if bn_weight is not None or bn_bias is not None:
        if bn_weight is None or bn_bias is None:
            raise ValueError("BatchNorm needs both bn_weight and bn_bias")
        for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
            _check_tensor(name, t, 2, dtype, device)
            _check_shape(name, t, (E, N))
        if bn_training:
            if B < 2:
                # Same rule as nn.BatchNorm1d in train mode.
                raise ValueError(f"train-mode BatchNorm needs more than 1 value per channel, got batch size {B}")
            bn_running_mean = bn_running_var = None
        else:
            if bn_running_mean is None or bn_running_var is None:
                raise ValueError("eval-mode BatchNorm (bn_training=False) needs bn_running_mean and bn_running_var")
            for name, t in (("bn_running_mean", bn_running_mean), ("bn_running_var", bn_running_var)):
                _check_float_input(name, t)
                if t.device != device:
                    raise ValueError(f"{name} is on {t.device}, expected {device}")
                _check_shape(name, t, (E, N))
    else:
        bn_running_mean = bn_running_var = None
        bn_training = False

    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    dropout_p = float(dropout_p) if training else 0.0
    seed = None
    if dropout_p > 0.0:
        # Drawn from torch's generator for x's device: torch.manual_seed makes runs repeatable.
        seed = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)

    params = (x, weight, bias, bn_weight, bn_bias, prelu_weight)
    reject_tangents("nextrec_fast::expert_layer_fwd", params)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    y, _, mean, var = torch.ops.nextrec_fast.expert_layer_fwd(
        x, weight, bias, input_index, bn_weight, bn_bias, bn_running_mean, bn_running_var, prelu_weight, seed,
        float(bn_eps), bool(bn_training), act, dropout_p, save)
    if bn_training:
        return y, mean, var
    return y, None, None


def gate_mixture(logits: Tensor, experts: Tensor, expert_index: Optional[Tensor] = None) -> Tensor:
    """out[t, b] = sum_s softmax(logits[t, b])[s] * experts[expert_index[t, s], b].

    logits [T, B, S] (T gates, softmax over S), experts [E, B, D], expert_index [T, S] int
    (None: S == E and slot s is expert s). Returns [T, B, D] in the experts' dtype."""
    _check_float_input("experts", experts)
    if experts.dim() != 3:
        raise ValueError(f"experts must be [E, B, D], got shape {tuple(experts.shape)}")
    _check_tensor("logits", logits, 3, experts.dtype, experts.device)
    T, B, S = logits.shape
    E, Be, D = experts.shape
    if B != Be:
        raise ValueError(f"logits batch {B} != experts batch {Be}")
    if min(T, B, S, E, D) < 1:
        raise ValueError(f"empty sizes are not supported: T={T}, B={B}, S={S}, E={E}, D={D}")
    if expert_index is None:
        if S != E:
            raise ValueError(f"without expert_index the gate width S={S} must equal the number of experts E={E}")
    else:
        _check_index("expert_index", expert_index, (T, S), experts.device)
    reject_tangents("nextrec_fast::gate_mixture_fwd", (logits, experts))
    return torch.ops.nextrec_fast.gate_mixture_fwd(logits, experts, expert_index)
