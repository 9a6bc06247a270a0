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
