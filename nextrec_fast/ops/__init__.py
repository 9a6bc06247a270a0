"""Custom torch ops (``torch.library``) of the package, under the ``nextrec_fast`` namespace.

Each op module registers its ops on import and says whether its backend is usable here:
- ``pooled_embedding``: C++/CUDA multi-feature embedding pooling (``csrc/``).
- ``batch_norm_act``: C++ BatchNorm + ReLU over many experts' channels (``csrc/``).
- ``reusable_buffer``: CPU output buffers reused across steps, for GEMMs written with ``out=``.
- ``gate_mixture``: C++ weighted sums of expert outputs by the gates' weights, on CPU (``csrc/``).
- ``dense_gemm``: float32 GEMMs into given outputs through oneDNN on CPU.
- ``triton_ops``: Triton expert-linear, BatchNorm and gate-mixture kernels (``kernels/``).

``import nextrec_fast`` calls :func:`register_ops`, so that anything loading an artifact that
calls our ops (a ``torch.export`` program, a compiled artifact) finds them after a plain import.
"""
from __future__ import annotations

import importlib

__all__ = ["register_ops", "empty_cache"]


def register_ops() -> None:
    """Register every op whose backend is installed, without building anything: the C++ ops when
    the prebuilt extension imports (a JIT build waits for the first layer that needs it), the
    Triton ops always (their definitions are Python; Triton itself is imported on first call)."""
    from nextrec_fast import _extension

    modules = ["triton_ops"]
    if _extension.load(build=False) is not None:
        modules += ["pooled_embedding", "batch_norm_act", "reusable_buffer", "gate_mixture"]
    for name in modules:
        importlib.import_module(f"nextrec_fast.ops.{name}")


def empty_cache() -> int:
    """Let go of the CPU buffers that the C++ ops and the expert GEMMs keep for reuse across calls
    (at most 32 buffers and 1 GiB; ``docs/internals.md``), as ``torch.cuda.empty_cache`` does for
    CUDA's cache: e.g. after inference at a large batch. Buffers still in use stay with their
    tensors. Returns the bytes released (int; 0 without the extension). It under-counts a buffer
    whose storage Python has asked for (``untyped_storage()``, e.g. through ``torch.save``): that
    one is released too, but not counted."""
    from nextrec_fast import _extension
    import torch

    if _extension.load(build=False) is None or not hasattr(torch.ops.nextrec_fast, "release_cached_buffers"):
        return 0
    return int(torch.ops.nextrec_fast.release_cached_buffers())
