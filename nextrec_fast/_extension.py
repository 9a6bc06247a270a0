"""Loads the C++/CUDA extension that registers the ``torch.ops.nextrec_fast`` pooling ops.

Order: the prebuilt ``nextrec_fast._C`` (built by setup.py); else a JIT build with
``torch.utils.cpp_extension.load`` from the sources shipped in ``nextrec_fast/csrc`` (CPU-only
sources unless CUDA is usable here), cached in torch's default extensions directory. Set
``NEXTREC_FAST_NO_JIT=1`` to disable the JIT. Nothing here raises: ``is_available()`` is False
when no route works and ``unavailable_reason()`` says why.
"""
from __future__ import annotations

import glob
import os
import threading

__all__ = ["load", "is_available", "unavailable_reason", "module"]

_lock = threading.Lock()
_module = None
_reason: str | None = None
_attempted = False


def _jit_build():
    import torch
    from torch.utils import cpp_extension

    import nextrec_fast.csrc

    src_dir = os.path.dirname(os.path.abspath(nextrec_fast.csrc.__file__))
    sources = sorted(glob.glob(os.path.join(src_dir, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no C++ sources found in {src_dir}")
    with_cuda = (
        torch.cuda.is_available()
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("NEXTREC_FAST_NO_CUDA") != "1"
    )
    cflags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]  # see setup.py
    kwargs = {}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(src_dir, "*.cu")))
        cflags.append("-DNEXTREC_FAST_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
    # Separate names keep the CPU-only and CUDA builds apart in the extensions cache.
    name = "nextrec_fast_C_cuda" if with_cuda else "nextrec_fast_C_cpu"
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[src_dir],
        verbose=os.environ.get("NEXTREC_FAST_JIT_VERBOSE") == "1",
        **kwargs,
    )


def load(build: bool = True):
    """Returns the extension module, or None (see ``unavailable_reason()``). Memoised.

    ``build=False`` (``import nextrec_fast``, which must stay cheap) only imports the prebuilt
    module; without one it returns None and leaves the JIT build to the first ``load()``.
    """
    global _module, _reason, _attempted
    with _lock:
        if _attempted:
            return _module
        try:
            from nextrec_fast import _C  # noqa: F401  (prebuilt by setup.py)

            _module = _C
            _attempted = True
            return _module
        except Exception as exc:  # ImportError, or an ABI mismatch (OSError/undefined symbol)
            prebuilt_error = f"prebuilt nextrec_fast._C not importable ({type(exc).__name__}: {exc})"
        if not build:
            return None
        _attempted = True
        if os.environ.get("NEXTREC_FAST_NO_JIT") == "1":
            _reason = f"{prebuilt_error}; JIT build disabled by NEXTREC_FAST_NO_JIT=1"
            return None
        try:
            _module = _jit_build()
        except Exception as exc:  # compiler missing, ninja missing, build error...
            _reason = f"{prebuilt_error}; JIT build failed ({type(exc).__name__}: {exc})"
        return _module


def is_available() -> bool:
    return load() is not None


def unavailable_reason() -> str:
    load()
    return _reason or ""


def module():
    return load()
