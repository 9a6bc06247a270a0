"""BatchNorm1d + ReLU over many experts' channels in one CPU op (``nextrec_fast::batch_norm_act_*``).

The kernels are C++ (``csrc/batch_norm_act.cpp``); this module adds their fake (meta)
implementations, the autograd formula through ``torch.library``, and the wrapper
:func:`batch_norm_act`. The op takes the output of a Linear computed *without* its bias and
the bias itself: under batch statistics the bias only shifts the mean, so folding it in saves
the bias pass of ``addmm`` and gives the bias its (near-zero) gradient like autograd would.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nextrec_fast import _extension
from nextrec_fast.ops._dispatch import call_op, create_graph_requested, grads_with_graph

__all__ = ["batch_norm_act", "bias_act", "is_available"]


def is_available() -> bool:
    return _OPS_REGISTERED


def batch_norm_act(x: Tensor, *, experts: int, linear_bias: Tensor | None, weight: Tensor | None,
                   bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                   training: bool, eps: float, relu: bool, out_expert_major: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``act(batch_norm(x + linear_bias))`` over ``C = E * N`` channels (expert-major order).

    ``x``: ``[B, C]``, ``[E, B, N]``, or ``[G, B, M*N]`` (G groups of M = E/G experts, e.g. one bmm
    over groups of experts sharing an input); the output is ``[E, B, N]`` if ``out_expert_major``
    else ``[B, C]``, in ``x``'s dtype. dtypes: float32 or float64 throughout; or a bfloat16 ``x``
    (what CPU autocast's GEMMs give) with float32 parameters and running statistics, computed in
    float32 as ``nn.BatchNorm1d`` does under autocast (the parameters' gradients are float32).
    ``training=True`` normalises with the batch statistics (``running_*`` are not
    touched: the caller updates them from the returned statistics); ``False`` with
    ``running_mean``/``running_var``. ``act`` is ReLU if ``relu`` else the identity.

    Returns ``(out, mean_x, var)``: ``mean_x`` is the per-channel mean of ``x`` *without*
    ``linear_bias`` (add it for BatchNorm's running mean), ``var`` the biased variance, both
    float64 whatever ``x``'s dtype (the backward forms its input gradient in double: it cancels
    heavily when the variance is near ``eps``, e.g. in small batches).

    Raises ``TypeError`` for another dtype (float16 included) or parameters of the wrong dtype,
    ``ValueError`` for shapes that do not split into ``experts`` or a training batch of one row.
    """
    if not _OPS_REGISTERED:
        raise RuntimeError(f"nextrec_fast batch_norm_act is unavailable: {_extension.unavailable_reason()}")
    args = (x, linear_bias, weight, bias, running_mean, running_var, int(experts), bool(training), float(eps),
            bool(relu), bool(out_expert_major))
    # Below the Autograd key when nothing needs a gradient (ops._dispatch): this op runs 2-3
    # times per expert bank and forward.
    return call_op(torch.ops.nextrec_fast.batch_norm_act_forward, args, (x, linear_bias, weight, bias))


def bias_act(x: Tensor, *, experts: int, linear_bias: Tensor | None, relu: bool,
             out_expert_major: bool) -> Tensor:
    """``act(x + linear_bias)`` in :func:`batch_norm_act`'s layouts (``x`` ``[B, C]``, ``[E, B, N]``
    or ``[G, B, M*N]``; the output ``[E, B, N]`` if ``out_expert_major`` else ``[B, C]``), for
    layers without a norm: one pass adds the Linear's bias, rectifies (``relu``; else the
    identity) and re-lays out (``nextrec_fast::bias_act_forward``).

    The forward is :func:`batch_norm_act`'s eval-mode kernel with identity statistics (running
    mean 0, variance 1, eps 0, no affine): the per-channel scale is exactly 1 and the shift
    exactly ``linear_bias``, so the output is ``x + linear_bias`` rounded once, ReLU'd, as
    ``torch.relu(x + b)``. The backward (``bias_act_backward``) reads the output, not ``x``:
    ReLU's mask from it is ``threshold_backward``'s, and autograd keeps one activation per layer
    (the next GEMM saves this output anyway). The bias's gradient is the input gradient's row sum,
    accumulated in double. dtypes: float32, float64, or bfloat16 with a float32 bias. Raises
    ``TypeError`` / ``ValueError`` as :func:`batch_norm_act` (a wrong dtype, shapes that do not
    split into ``experts``)."""
    if not _OPS_REGISTERED:
        raise RuntimeError(f"nextrec_fast batch_norm_act is unavailable: {_extension.unavailable_reason()}")
    args = (x, linear_bias, int(experts), bool(relu), bool(out_expert_major))
    return call_op(torch.ops.nextrec_fast.bias_act_forward, args, (x, linear_bias))


def _shape(x: Tensor, experts: int) -> tuple[int, int, int]:
    """(E, B, N) of x: [B, E*N] or [G, B, (E/G)*N]."""
    if x.dim() == 3:
        return experts, x.shape[1], x.shape[2] // (experts // x.shape[0])
    torch._check(x.dim() == 2, lambda: f"batch_norm_act: x must be [B, C] or [G, B, M*N], got {tuple(x.shape)}")
    return experts, x.shape[0], x.shape[1] // experts


def _register_fakes():
    @torch.library.register_fake("nextrec_fast::batch_norm_act_forward")
    def _forward_fake(x, linear_bias, weight, bias, running_mean, running_var, experts, training, eps, relu,
                      out_expert_major):
        e, b, n = _shape(x, experts)
        out = x.new_empty((e, b, n) if out_expert_major else (b, e * n))
        return out, x.new_empty(e * n, dtype=torch.float64), x.new_empty(e * n, dtype=torch.float64)

    @torch.library.register_fake("nextrec_fast::batch_norm_act_backward")
    def _backward_fake(grad_out, x, linear_bias, weight, bias, mean_x, var, experts, training, eps, relu,
                       out_expert_major):
        channels = mean_x.shape[0]
        dtype = _param_dtype(x.dtype)
        return (x.new_empty(x.shape), *(x.new_empty(channels, dtype=dtype) for _ in range(3)))


def _register_bias_act():
    @torch.library.register_fake("nextrec_fast::bias_act_forward")
    def _forward_fake(x, linear_bias, experts, relu, out_expert_major):
        e, b, n = _shape(x, experts)
        return x.new_empty((e, b, n) if out_expert_major else (b, e * n))

    @torch.library.register_fake("nextrec_fast::bias_act_backward")
    def _backward_fake(grad_out, out, experts, x_groups, relu):
        b, c = (out.shape[1], out.shape[0] * out.shape[2]) if out.dim() == 3 else (out.shape[0], out.shape[1])
        grad_x = out.new_empty((b, c) if x_groups == 1 else (x_groups, b, c // x_groups))
        return grad_x, out.new_empty(c, dtype=_param_dtype(out.dtype))

    def setup_context(ctx, inputs, output):
        x, _linear_bias, experts, relu, _out_expert_major = inputs
        ctx.save_for_backward(output)
        ctx.flags = (experts, x.shape[0] if x.dim() == 3 else 1, relu)
        ctx.x_shape = x.shape  # [1, B, C] (one group) comes back from the op as [B, C]

    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        experts, x_groups, relu = ctx.flags
        if create_graph_requested():
            # Differentiable ops (a gradient penalty through this layer): ReLU's mask from the
            # output, then the layout change, each of which autograd can differentiate again.
            g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
            flat = g.transpose(0, 1).reshape(g.shape[1], -1) if g.dim() == 3 else g  # [B, C]
            if x_groups == 1:
                grad_x = flat.reshape(ctx.x_shape)
            else:
                grad_x = flat.view(flat.shape[0], x_groups, -1).transpose(0, 1)
            grad_bias = flat.sum(0).to(_param_dtype(out.dtype)) if ctx.needs_input_grad[1] else None
            return grad_x, grad_bias, None, None, None
        grad_x, grad_bias = torch.ops.nextrec_fast.bias_act_backward(grad_out, out, experts, x_groups, relu)
        needs = ctx.needs_input_grad
        return grad_x.view(ctx.x_shape) if needs[0] else None, grad_bias if needs[1] else None, None, None, None

    torch.library.register_autograd("nextrec_fast::bias_act_forward", backward, setup_context=setup_context)


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The parameters' dtype for activations of ``dtype``: float32 under bfloat16 (autocast's master weights)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _setup_context(ctx, inputs, output):
    x, linear_bias, weight, bias, running_mean, running_var, experts, training, eps, relu, out_expert_major = inputs
    _, mean_x, var = output
    ctx.mark_non_differentiable(mean_x, var)
    ctx.save_for_backward(x, linear_bias, weight, bias, mean_x, var)
    ctx.flags = (experts, training, eps, relu, out_expert_major)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    x, linear_bias, weight, bias, mean_x, var = ctx.saved_tensors
    experts, training, eps, relu, out_expert_major = ctx.flags
    if create_graph_requested():
        # A gradient penalty, GradNorm, Hessian-vector products: the first derivative comes from
        # autograd over the same computation in PyTorch ops, which can be differentiated again.
        out = _reference_forward(x, linear_bias, weight, bias, mean_x, var, experts, training, eps, relu,
                                 out_expert_major)
        grads = grads_with_graph(out, (x, linear_bias, weight, bias), ctx.needs_input_grad[:4], grad_out)
        return (*grads, *([None] * 7))
    grad_x, grad_linear_bias, grad_weight, grad_bias = torch.ops.nextrec_fast.batch_norm_act_backward(
        grad_out, x, linear_bias, weight, bias, mean_x, var, experts, training, eps, relu,
        out_expert_major)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_linear_bias if needs[1] else None,
            grad_weight if needs[2] else None, grad_bias if needs[3] else None,
            None, None, None, None, None, None, None)


def _reference_forward(x: Tensor, linear_bias, weight, bias, mean_x: Tensor, var: Tensor, experts: int,
                       training: bool, eps: float, relu: bool, out_expert_major: bool) -> Tensor:
    """The op's output in PyTorch ops, differentiable in ``x`` and the parameters: batch
    statistics from ``x`` when ``training``, else the forward's running statistics (``mean_x``
    = running mean - linear bias, ``var``) as constants. Computed in the parameters' dtype."""
    e, b, n = _shape(x, experts)
    dtype = _param_dtype(x.dtype)
    flat = (x.transpose(0, 1).reshape(b, e * n) if x.dim() == 3 else x).to(dtype)  # [B, C], expert-major channels
    if linear_bias is not None:
        flat = flat + linear_bias
    if training:
        mean = flat.mean(0)
        variance = (flat - mean).square().mean(0)  # biased, as BatchNorm normalises
    else:
        mean = mean_x.to(dtype) + (0 if linear_bias is None else linear_bias.detach())
        variance = var.to(dtype)
    out = (flat - mean) * torch.rsqrt(variance + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    if relu:
        out = torch.relu(out)
    out = out.to(x.dtype)
    return out.view(b, e, n).transpose(0, 1) if out_expert_major else out


def _register() -> bool:
    if not _extension.is_available() or not all(hasattr(torch.ops.nextrec_fast, name) for name in (
            "batch_norm_act_forward", "bias_act_forward")):
        return False  # (an extension built from older sources lacks bias_act: the PyTorch path runs)
    _register_fakes()
    torch.library.register_autograd("nextrec_fast::batch_norm_act_forward", _backward, setup_context=_setup_context)
    _register_bias_act()
    return True


_OPS_REGISTERED = _register()
