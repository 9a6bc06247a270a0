"""``gate_mixture``: the gates' weighted sums of expert outputs on the CPU, one C++ pass each way.

``out[b, g, :] = sum_e weights[b, g, e] * experts[b, e, :]`` is MMoE's and PLE's gated mixture
(Ma et al. 2018, eq. 5; Tang et al. 2020, eq. 3). As ``torch.bmm`` it is 2048 products of
``[G, E] @ [E, D]`` with G, E <= ~8, which a GEMM library runs at a fraction of memory speed:
the forward and the two gradient products took about 0.5 ms each per PLE level at batch 2048
(2 threads). ``nextrec_fast::gate_mixture_forward`` / ``gate_mixture_backward`` (``csrc/
gate_mixture.cpp``) stream the experts once per direction, the backward writing both gradients.

The result differs from ``torch.bmm``'s by float rounding only (a sum over E in expert order;
the weight gradient's sum over D in 16 running partial sums): ``tests/test_gate_mixture.py``
judges both against float64. On CUDA the Triton gate-mixture op runs instead (``triton_ops``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nextrec_fast import _extension
from nextrec_fast.ops._dispatch import call_op, create_graph_requested

__all__ = ["gate_mixture", "is_available"]


def is_available() -> bool:
    return _OPS_REGISTERED


def gate_mixture(weights: Tensor, experts: Tensor) -> Tensor:
    """``torch.bmm(weights, experts)`` for gates: ``weights`` ``[B, G, E]`` (each gate's softmax
    weights over the experts, zeros for experts a gate does not see), ``experts`` ``[B, E, D]``
    (any strides; a transposed view of an ``[E, B, D]`` bank output is read in place) -> ``[B, G, D]``.

    CPU tensors of one dtype, float32 or float64. Differentiable in both inputs; the experts'
    gradient comes back in their layout (``[B, E, D]`` or the ``[E, B, D]`` transpose). Raises
    ``ValueError`` on shapes that do not match, ``TypeError`` on other dtypes, ``RuntimeError``
    where the extension is not built."""
    if not _OPS_REGISTERED:
        raise RuntimeError(f"nextrec_fast gate_mixture is unavailable: {_extension.unavailable_reason()}")
    return call_op(torch.ops.nextrec_fast.gate_mixture_forward, (weights, experts), (weights, experts))


def _check_inputs(weights: Tensor, experts: Tensor) -> None:
    """The C++ op's checks, for the fakes (a trace must fail where the run would)."""
    torch._check_value(weights.dim() == 3 and experts.dim() == 3,
                       lambda: f"gate_mixture: weights must be [B, G, E] and experts [B, E, D], got "
                               f"{tuple(weights.shape)} and {tuple(experts.shape)}")
    torch._check_value(weights.shape[0] == experts.shape[0] and weights.shape[2] == experts.shape[1],
                       lambda: f"gate_mixture: weights {tuple(weights.shape)} do not match experts "
                               f"{tuple(experts.shape)} (batch and expert counts must agree)")
    torch._check_type(weights.dtype == experts.dtype and weights.dtype in (torch.float32, torch.float64),
                      lambda: f"gate_mixture: weights and experts must share a float32 or float64 dtype, got "
                              f"{weights.dtype} and {experts.dtype}")


def _register() -> bool:
    if not _extension.is_available() or not hasattr(torch.ops.nextrec_fast, "gate_mixture_forward"):
        return False  # an extension built from older sources

    @torch.library.register_fake("nextrec_fast::gate_mixture_forward")
    def _forward_fake(weights, experts):
        _check_inputs(weights, experts)
        return experts.new_empty((weights.shape[0], weights.shape[1], experts.shape[2]))

    @torch.library.register_fake("nextrec_fast::gate_mixture_backward")
    def _backward_fake(grad_out, weights, experts):
        _check_inputs(weights, experts)
        torch._check(grad_out.dtype == weights.dtype and grad_out.dim() == 3
                     and tuple(grad_out.shape) == (weights.shape[0], weights.shape[1], experts.shape[2]),
                     lambda: f"gate_mixture_backward: grad_out must be [B, G, D] of {weights.dtype}, got "
                             f"{tuple(grad_out.shape)} {grad_out.dtype}")
        # The expert gradient's layout as the kernel picks it (csrc/gate_mixture.cpp,
        # empty_like_layout): expert-major for the transpose of a contiguous [E, B, D].
        b, e, d = experts.shape
        if experts.stride(2) == 1 and experts.stride(0) == d and experts.stride(1) == b * d and b > 1 and e > 1:
            grad_experts = experts.new_empty((e, b, d)).transpose(0, 1)
        else:
            grad_experts = experts.new_empty((b, e, d))
        return weights.new_empty(weights.shape), grad_experts

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_out):
        weights, experts = ctx.saved_tensors
        if create_graph_requested():  # differentiable ops, for a second derivative
            return (torch.bmm(grad_out, experts.transpose(1, 2)) if ctx.needs_input_grad[0] else None,
                    torch.bmm(weights.transpose(1, 2), grad_out) if ctx.needs_input_grad[1] else None)
        grad_weights, grad_experts = torch.ops.nextrec_fast.gate_mixture_backward(grad_out, weights, experts)
        return (grad_weights if ctx.needs_input_grad[0] else None,
                grad_experts if ctx.needs_input_grad[1] else None)

    torch.library.register_autograd("nextrec_fast::gate_mixture_forward", backward, setup_context=setup_context)
    return True


_OPS_REGISTERED = _register()
