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

__all__ = ["call_op"]

# Private torch API: where it is missing, assume a transform may be active (the safe answer).
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _needs_autograd(differentiable: Iterable[torch.Tensor | None]) -> bool:
    if torch.compiler.is_compiling() or _functorch_transforms_active():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in differentiable)


def call_op(op, args: tuple, differentiable: Iterable[torch.Tensor | None]):
    """``op(*args)``; below the Autograd key when none of ``differentiable`` (the op's inputs
    that have a gradient formula; None entries allowed) needs a gradient."""
    if _needs_autograd(differentiable):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
