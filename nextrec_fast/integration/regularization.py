"""nextrec's L1/L2 regularisation with its gradient added in place at the end of the backward.

``regularization_loss(terms)`` returns the value of nextrec's ``add_reg_loss`` (``sum l1 *
|p|_1 + l2 * |p|_2^2`` over the terms the compat layer lists), but its gradient ``l1 * sign(p)
+ 2 * l2 * p`` is added straight into each ``.grad`` once autograd has accumulated the loss
gradients, in chunks, instead of an autograd graph with several full-size temporaries per
embedding table. ``torch.autograd.grad(total_loss, params)`` therefore does not see it;
``loss.backward()`` (nextrec's ``fit``) does.
"""
from __future__ import annotations

import torch

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
    def backward(ctx, grad_output):
        terms = ctx.terms
        # Run once the whole backward has accumulated the loss gradients into .grad, so the
        # regularisation is added in place rather than as one more full-size gradient.
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: _add_regularization_grads(terms, float(grad_output)))
        return (None,) + (None,) * len(terms)


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
def _add_regularization_grads(terms, scale: float) -> None:
    for param, l1, l2 in terms:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad.view(-1)
        for start, p in _chunks(param):
            g = grad[start:start + p.numel()]
            if l1:
                g.add_(p.sign(), alpha=l1 * scale)
            if l2:
                g.add_(p, alpha=2.0 * l2 * scale)
