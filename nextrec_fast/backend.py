"""Which implementation the fast models use, for debugging and comparison.

- ``auto`` (default): Triton kernels for CUDA tensors when available, the C++/CUDA pooling op when
  the extension is built, batched PyTorch otherwise.
- ``torch``: batched PyTorch only (no Triton, no C++ extension).
- ``reference``: nextrec's own per-feature, per-expert loops (``nextrec_fast.reference``).
Set with the environment variable ``NEXTREC_FAST_BACKEND`` or ``set_backend``.
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
_override: str | None = None


def get_backend() -> str:
    name = _override or os.environ.get("NEXTREC_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"NEXTREC_FAST_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for this process (None: back to the environment variable / auto)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _override = name


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("reference"): ...``"""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def use_triton(tensor) -> bool:
    """Whether the Triton kernels handle ``tensor``'s computation: the ``triton`` backend forces
    them (an error where they cannot run), ``auto`` takes them for CUDA tensors when available."""
    backend = get_backend()
    if backend in ("torch", "reference"):
        return False
    if backend == "triton":
        if not _triton_available(str(tensor.device)):
            raise RuntimeError(f"NEXTREC_FAST_BACKEND=triton, but the Triton kernels cannot run on {tensor.device} "
                               "(they need CUDA, or TRITON_INTERPRET=1 set before import for CPU tensors)")
        return True
    return tensor.is_cuda and _triton_available(str(tensor.device))


@torch.compiler.assume_constant_result
def _triton_available(device: str) -> bool:
    # A constant for torch.compile: the check imports modules, which dynamo should not trace.
    from nextrec_fast.ops import triton_ops
    return triton_ops.is_available(device)
