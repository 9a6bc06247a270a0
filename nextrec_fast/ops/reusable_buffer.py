"""``reusable_empty``: uninitialised CPU buffers that are reused across training steps.

A training step frees its activations and gradients and allocates the same shapes again in the
next step. glibc gives large freed blocks back to the OS, so each step page-faults them in again
(the kernel zero-fills every 4 KiB page on first touch). The C++ ops already take their outputs
from a pool of buffers nothing references any more (``csrc/output_cache.h``); this op hands out
the same pool's buffers to Python code that writes with ``out=`` (the expert GEMMs).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from nextrec_fast import _extension

__all__ = ["is_available", "reusable_empty"]

# Below the pool's own minimum (output_cache.h kMinBytes) malloc's free lists serve the buffer.
MIN_BYTES = 1 << 20


def is_available() -> bool:
    return _OPS_REGISTERED


def reusable_empty(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device.

    On CPU with the extension built, a buffer of the pool that nothing (no tensor, view or saved
    tensor) references any more, else ``like.new_empty(shape)``. Write all of it before reading."""
    if _OPS_REGISTERED and like.device.type == "cpu":
        return torch.ops.nextrec_fast.reusable_empty(like, list(shape))
    return like.new_empty(shape)


def _register() -> bool:
    if not _extension.is_available() or not hasattr(torch.ops.nextrec_fast, "reusable_empty"):
        return False

    @torch.library.register_fake("nextrec_fast::reusable_empty")
    def _fake(like, size):
        return like.new_empty(size)

    return True


_OPS_REGISTERED = _register()
