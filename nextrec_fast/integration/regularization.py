"""nextrec's L1/L2 regularisation as one autograd node with one gradient per parameter.

``regularization_loss(terms)`` returns the value of nextrec's ``add_reg_loss`` (``sum l1 *
|p|_1 + l2 * |p|_2^2`` over the terms the compat layer lists) from one foreach pass per (l1, l2) group, and its
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
            for (l1, l2, dtype, _), group in _groups(terms, range(len(terms))).items():
                tensors = [terms[i][0].detach() for i in group]
                # Half-precision tables accumulate in float32, as nextrec's .sum() does.
                acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
                if l1:
                    total += l1 * torch.stack(torch._foreach_norm(tensors, 1, dtype=acc)).sum().float()
                if l2:
                    total += l2 * torch.stack(torch._foreach_norm(tensors, 2, dtype=acc)).square().sum().float()
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads = [None] * len(ctx.terms)
        needed = [i for i, n in enumerate(ctx.needs_input_grad[1:]) if n]
        with torch.no_grad():
            for (l1, l2, dtype, _), group in _groups(ctx.terms, needed).items():
                params = [ctx.terms[i][0].detach() for i in group]
                out = torch._foreach_mul(params, 2.0 * l2) if l2 else [torch.zeros_like(p) for p in params]
                if l1:
                    torch._foreach_add_(out, torch._foreach_sign(params), alpha=l1)
                torch._foreach_mul_(out, grad_output.to(dtype))
                for i, g in zip(group, out):
                    grads[i] = g
        return (None, *grads)


def _groups(terms, indices) -> dict:
    """Term indices by (l1, l2, dtype, device): what one foreach call may take together."""
    groups: dict = {}
    for i in indices:
        param, l1, l2 = terms[i]
        groups.setdefault((l1, l2, param.dtype, param.device), []).append(i)
    return groups
