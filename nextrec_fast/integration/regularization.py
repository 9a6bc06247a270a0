"""nextrec's L1/L2 regularisation as one autograd node with one gradient per parameter.

``regularization_loss(terms)`` returns the value of nextrec's ``add_reg_loss`` (``sum l1 *
|p|_1 + l2 * |p|_2^2`` over the terms the compat layer lists) from chunked passes, and its
backward returns ``grad_output * (l1 * sign(p) + 2 * l2 * p)`` for each parameter: one
full-size tensor per parameter where nextrec's graph (abs, pow, sums and their backwards)
makes several per embedding table.

The gradient goes through autograd like any other, so everything that hooks autograd sees it:
DDP's all-reduce (with ``no_sync`` and ``gradient_as_bucket_view``), GradScaler's scale (in
``grad_output``), ``torch.autograd.grad`` and ``backward(inputs=...)``. (An earlier version added
it into ``.grad`` after the backward; DDP's own end-of-backward write then overwrote it.)
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["regularization_loss"]

# Elements per step of the chunked passes: the chunk's temporaries stay in cache and are reused
# by the allocator instead of being faulted in as full-size tensors.
_CHUNK = 1 << 18


def regularization_loss(terms: list[tuple[torch.Tensor, float, float]], device) -> torch.Tensor:
    """``terms``: (parameter, l1, l2) triples; a float32 scalar on ``device``."""
    if not terms:
        return torch.tensor(0.0, device=device)
    return _RegularizationLoss.apply(terms, *[p for p, _, _ in terms])


class _RegularizationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, terms, *params):
        ctx.terms = terms
        total = torch.zeros((), dtype=torch.float32, device=params[0].device)
        with torch.no_grad():
            for param, l1, l2 in terms:
                abs_sum, square_sum = _abs_and_square_sums(param)
                total += l1 * abs_sum + l2 * square_sum
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads = [_regularization_grad(param, l1, l2, grad_output) if needed else None
                 for (param, l1, l2), needed in zip(ctx.terms, ctx.needs_input_grad[1:])]
        return (None, *grads)


def _chunks(tensor: torch.Tensor):
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start:start + _CHUNK]


def _abs_and_square_sums(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(|p|) and sum(p * p) in one pass over p (fp32 accumulation, as nextrec's .sum())."""
    abs_sum = torch.zeros((), dtype=torch.float32, device=param.device)
    square_sum = torch.zeros((), dtype=torch.float32, device=param.device)
    for _, chunk in _chunks(param):
        abs_sum += chunk.abs().sum(dtype=torch.float32)
        square_sum += torch.dot(chunk, chunk).float() if chunk.dtype == torch.float32 else chunk.square().sum(dtype=torch.float32)
    return abs_sum, square_sum


@torch.no_grad()
def _regularization_grad(param: torch.Tensor, l1: float, l2: float, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad_output * (l1 * sign(p) + 2 * l2 * p)``, built chunk by chunk into one tensor."""
    grad = torch.empty_like(param)
    flat = grad.view(-1)
    for start, p in _chunks(param):
        g = flat[start:start + p.numel()]
        if l2:
            torch.mul(p, 2.0 * l2, out=g)
        else:
            g.zero_()
        if l1:
            g.add_(p.sign(), alpha=l1)
    return grad.mul_(grad_output.to(grad.dtype))
