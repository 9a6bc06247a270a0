"""Calling our ops below the Autograd key when nothing needs a gradient.

torch.library's autograd wrapper for a custom op is Python: without anything to differentiate
(inference, ``no_grad``) it only redispatches below the Autograd key, after a round trip that
costs about 30 us of a 100 us pooling call at batch 1. The op wrappers call the kernel there
directly instead; under torch.compile and functorch transforms (which trace or wrap the
dispatcher's Autograd key) they always take the autograd path.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["call_op", "create_graph_requested", "forward_ad_active", "functorch_transforms_active",
           "grads_with_graph", "reject_tangents"]

# Private torch API: where it is missing, assume a transform may be active (the safe answer).
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, jacrev, ...) wraps this call; False
    while torch.compile traces (it runs functorch's machinery itself)."""
    return not torch.compiler.is_compiling() and _functorch_transforms_active()


def forward_ad_active() -> bool:
    """Whether forward-mode AD may be running: inside ``torch.autograd.forward_ad.dual_level()``,
    or ``torch.func.jvp`` / ``jacfwd`` / ``hessian`` (they open a dual level too). Our ops have
    no forward-mode formula: torch.library's autograd wrapper drops the tangents silently."""
    # forward_ad's level counter is private; where it is missing, assume forward AD may run.
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


def reject_tangents(op, inputs: Iterable[torch.Tensor | None]) -> None:
    """Raise ``NotImplementedError`` if one of ``inputs`` carries a forward-mode tangent: ``op``
    would return none (torch.library's autograd wrapper drops them without a word)."""
    if forward_ad_active() and any(
            t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in inputs):
        raise NotImplementedError(
            f"{op} has no forward-mode AD formula (torch.autograd.forward_ad, torch.func.jvp, jacfwd): "
            "its output would carry no tangent. Run this code under nextrec_fast.use_backend('reference'), "
            "or call the model, which falls back to nextrec's own forward under forward-mode AD.")


def create_graph_requested() -> bool:
    """In an autograd backward: whether it runs with ``create_graph=True`` (grad mode is on only
    then), so the gradients must themselves be differentiable. Our C++ and Triton backwards have
    no derivative of their own. False while torch.compile traces the backward."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def grads_with_graph(out: torch.Tensor, inputs, needs, grad_out: torch.Tensor) -> list:
    """``torch.autograd.grad(out, ..., grad_out, create_graph=True)`` for the ``inputs`` whose
    ``needs`` flag is set, aligned with ``inputs``: None where not needed, or where ``out`` does
    not depend on the input. For a backward under :func:`create_graph_requested`, with ``out``
    recomputed from the saved inputs in PyTorch ops."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    computed = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True)
                    if wanted and out.requires_grad else [None] * len(wanted))
    return [next(computed) if need else None for need in needs]


def _needs_autograd(differentiable: Iterable[torch.Tensor | None]) -> bool:
    if torch.compiler.is_compiling() or _functorch_transforms_active():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in differentiable)


def call_op(op, args: tuple, differentiable: Iterable[torch.Tensor | None]):
    """``op(*args)``; below the Autograd key when none of ``differentiable`` (the op's inputs
    that have a gradient formula; None entries allowed) needs a gradient.

    Raises ``NotImplementedError`` when one of ``differentiable`` carries a forward-mode tangent
    (:func:`reject_tangents`). The models fall back to nextrec's own math there."""
    reject_tangents(op, differentiable)
    if _needs_autograd(differentiable):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
