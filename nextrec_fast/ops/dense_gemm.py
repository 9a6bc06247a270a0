"""``gemm_into``: the experts' float32 GEMMs on CPU, through oneDNN where it is the faster library.

``torch.mm`` runs float32 GEMMs through the BLAS PyTorch was built with (MKL in the PyPI
wheels); PyTorch sends only bfloat16 / float16 (or reduced-precision float32) to oneDNN. On an
AMD EPYC (AVX-512), MKL's sgemm took about 2.1x oneDNN's time for the expert shapes at batch
>= 256 (forward, input-gradient and weight-gradient GEMMs, same threads); on an Intel Xeon
(AVX-512, AMX) MKL was the faster one (oneDNN 1.04x MKL's time over a PLE training step's
GEMMs, the step itself 4-5% slower). So float32 GEMMs go to oneDNN by default on x86 CPUs that
are not Intel's (``routed()``). The C++ op ``nextrec_fast::onednn_gemm_out`` calls PyTorch's own oneDNN matmul
(``at::native::mkldnn_matmul``) into the caller's output, so the reused buffers and strided
column blocks of ``nextrec_fast.layers.experts`` keep working.

The result differs from ``torch.mm``'s by float32 rounding only: ``tests/test_onednn_gemm.py``
compares both with float64 (oneDNN's median relative error was 1.3-1.5x MKL's at these shapes,
the weight gradient's sum over 2048-8192 rows included).
Small GEMMs (below ``ONEDNN_MIN_MACS`` multiply-adds, where oneDNN's per-call setup costs more
than it saves), other dtypes, autocast, the ``torch`` / ``reference`` backends, a build without
the extension, Intel CPUs, and ``NEXTREC_FAST_ONEDNN_GEMM=0`` all take ``torch.mm`` /
``torch.bmm`` as before; ``NEXTREC_FAST_ONEDNN_GEMM=1`` sends them to oneDNN on Intel CPUs too.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
import warnings

import torch

from nextrec_fast.backend import get_backend

__all__ = ["gemm_into", "onednn_operand", "uses_onednn", "is_available", "unavailable_reason", "routed",
           "float32_library", "ONEDNN_MIN_MACS"]

# 2 threads, this VM: oneDNN 1.4x at 64 x 477 x 256 (7.8M multiply-adds), even at 64 x 256 x 128
# (2.1M), slower below (its primitive lookup costs ~10 us a call). NEXTREC_FAST_ONEDNN_MIN_MACS=0
# sends every float32 GEMM there (the tests use it to run the small models through oneDNN).
ONEDNN_MIN_MACS = int(os.environ.get("NEXTREC_FAST_ONEDNN_MIN_MACS", 1 << 22))


def _setting() -> str:
    """``NEXTREC_FAST_ONEDNN_GEMM``: "1" (oneDNN wherever it runs), "0" (never) or "auto" (unset:
    ``routed()``'s rule). Any other value warns and counts as "auto". Read once per process (the
    callers are cached)."""
    value = os.environ.get("NEXTREC_FAST_ONEDNN_GEMM", "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        warnings.warn(f"NEXTREC_FAST_ONEDNN_GEMM={value!r} is not 0, 1 or auto: taken as auto", stacklevel=3)
        return "auto"
    return value


def is_available() -> bool:
    """Whether float32 GEMMs can reach oneDNN here: an x86-64 CPU that oneDNN's float32 matmul
    runs on (AVX-512), a torch built with oneDNN, the extension built, a libtorch that exports
    PyTorch's oneDNN matmul, and ``NEXTREC_FAST_ONEDNN_GEMM`` not 0 (``unavailable_reason()``
    None: probed once per process)."""
    return unavailable_reason() is None


@functools.cache
def unavailable_reason() -> str | None:
    """None where float32 GEMMs can reach oneDNN here; else why not, in words (for skip messages
    and the bench header). Probed once (one tiny GEMM), which also registers the op's fake (the
    extension is loaded lazily, never at import)."""
    if _setting() == "0":
        return "NEXTREC_FAST_ONEDNN_GEMM=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        # measured on x86 only; on Arm oneDNN's float32 matmul is a different (ACL) library
        return f"not an x86-64 CPU ({platform.machine()})"
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN"
    from nextrec_fast import _extension
    if not _extension.is_available():
        return f"the C++ extension is unavailable: {_extension.unavailable_reason()}"
    if not hasattr(torch.ops.nextrec_fast, "onednn_gemm_out"):
        return "the C++ extension was built from sources without onednn_gemm_out: rebuild it"

    _register_fake()
    if _onednn_runs_float32():
        return None
    flags = cpu_flags()
    if flags and "avx512f" not in flags:  # (/proc/cpuinfo does not list AVX-NE-CONVERT)
        return ("PyTorch's oneDNN matmul takes float32 only on CPUs with AVX-512 (or AVX-NE-CONVERT); "
                "this one reports no AVX-512")
    return "PyTorch's oneDNN matmul refused float32 on this CPU, or this libtorch lacks at::native::mkldnn_matmul"


@functools.cache
def _register_fake() -> None:
    """The op's fake, once per process: its own cache, because older torch refuses a second fake
    and the tests clear ``unavailable_reason``'s."""
    @torch.library.register_fake("nextrec_fast::onednn_gemm_out")
    def _fake(a, b, out, accumulate=False):  # writes ``out`` only
        return None


def _onednn_runs_float32() -> bool:
    """The extension's probe: one tiny float32 GEMM through PyTorch's oneDNN matmul."""
    return bool(torch.ops.nextrec_fast.onednn_gemm_available())


@functools.cache
def routed() -> bool:
    """Whether float32 GEMMs go to oneDNN (where ``is_available()``): ``NEXTREC_FAST_ONEDNN_GEMM``
    "1" yes, "0" no; unset (or "auto"): yes unless the CPU is Intel's, where MKL, the BLAS
    ``torch.mm`` calls, is tuned for the CPU it runs on and was the faster one (module docstring).
    A CPU whose vendor is not known (``cpu_vendor()`` "": not Linux or Windows, e.g. macOS)
    counts as not Intel's."""
    setting = _setting()
    if setting != "auto":
        return setting == "1"
    return cpu_vendor() != "GenuineIntel"


@functools.cache
def cpu_vendor() -> str:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD"): ``vendor_id`` of /proc/cpuinfo on
    Linux, ``PROCESSOR_IDENTIFIER`` on Windows; "" where neither says."""
    vendor = _cpuinfo_field("vendor_id")
    if vendor is not None:
        return vendor
    if sys.platform == "win32":  # e.g. "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"
        identifier = os.environ.get("PROCESSOR_IDENTIFIER", "")
        return identifier.rsplit(",", 1)[-1].strip() if "," in identifier else ""
    return ""


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo ("avx2", "avx512f", ...); empty where it is not
    readable (not Linux)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` line's value in /proc/cpuinfo; None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _onednn_on() -> bool:
    """Whether large float32 CPU GEMMs go to oneDNN at all: not under the ``torch`` / ``reference``
    backends (pure PyTorch), where oneDNN runs here and ``routed()`` sends them there."""
    return get_backend() in ("auto", "triton") and is_available() and routed()


def float32_library() -> str:
    """What runs the fast path's large float32 CPU GEMMs here (from ``ONEDNN_MIN_MACS``
    multiply-adds up): "oneDNN" or "torch.mm" (the BLAS torch was built with: MKL in the x86
    wheels). For benchmark reports."""
    return "oneDNN" if _onednn_on() else "torch.mm"


# Batched products with fewer output columns than this stay with torch.bmm: many tiny matrices
# (the gates' mixture weight gradient, [2048, G, 128] @ [2048, 128, E] with E = 6 or 8) took
# oneDNN 2.1-2.5x torch.bmm's time (2 threads), where wider ones (the mixture itself, N = 128)
# ran 0.7-0.9x.
BATCHED_MIN_N = 16


def uses_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``gemm_into`` sends ``a @ b`` to oneDNN."""
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu":
        return False
    if a.dim() == 3 and a.shape[0] > 1 and b.shape[-1] < BATCHED_MIN_N:
        return False
    macs = a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
    if macs < ONEDNN_MIN_MACS:
        return False
    return _onednn_on()


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out = a @ b (+ bias)``, written in place, no autograd.

    ``a`` ``[M, K]`` and ``b`` ``[K, N]`` into ``out`` ``[M, N]``, or batched ``[E, M, K]``,
    ``[E, K, N]`` into ``[E, M, N]``; any strides. ``bias`` broadcasts to ``out`` (``[N]``,
    ``[E, 1, N]``); with oneDNN it is written into ``out`` first and the product added (one
    rounding, as addmm). Raises RuntimeError (from the op or torch.mm) on shapes that do not
    multiply, and when autograd would need to see the product (an input requires grad with
    grad mode on: the write is invisible to autograd). ``out`` must not overlap ``a`` or ``b``."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("gemm_into writes without autograd: call it under torch.no_grad() or inside an "
                           "autograd.Function, or use torch.mm / F.linear where gradients must flow")
    if a.dim() == 3 and a.shape[0] == 1:  # one "expert": 2-D, whose strides oneDNN reads without a copy
        a, b, out = a[0], b[0], out[0]
        bias = bias[0] if bias is not None and bias.dim() == 3 else bias
    if uses_onednn(a, b) and (out.stride(-1) == 1 or out.stride(-2) == 1):
        if bias is not None:
            out.copy_(bias.expand(out.shape))
        if out.stride(-1) != 1:  # column-major output (a weight_t gradient): oneDNN writes C^T = B^T A^T
            out, a, b = out.mT, b.mT, a.mT
        torch.ops.nextrec_fast.onednn_gemm_out(_onednn_layout(a), _onednn_layout(b), out, bias is not None)
    elif a.dim() == 2:
        if bias is None:
            torch.mm(a, b, out=out)
        else:
            torch.addmm(bias, a, b, out=out)
    elif bias is None:
        torch.bmm(a, b, out=out)
    else:
        torch.baddbmm(bias, a, b, out=out)


def onednn_operand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` as ``gemm_into(out, a, b)`` hands it to oneDNN: unchanged where oneDNN does not take
    ``a @ b`` or reads ``a``'s layout as it is, else a dense copy from the buffer pool. For a
    caller that uses ``a`` in two GEMMs (an input gradient and a weight gradient from the same
    column block), so that it is copied once, not once per GEMM."""
    return _onednn_layout(a) if uses_onednn(a, b) else a


def _onednn_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` as oneDNN's matmul reads it without a copy (row-major, or its last two dims
    transposed, densely), else a copy in that form. PyTorch's oneDNN matmul copies other layouts
    with ``.contiguous()``, which for a transposed column block (the weight gradient's
    ``grad[:, block].t()``) is a slow strided gather; copying along the rows and transposing the
    view reads and writes memory in order."""
    rows, cols = t.shape[-2], t.shape[-1]
    dense_batch = t.dim() == 2 or t.stride(0) == rows * cols
    if dense_batch and ((t.stride(-1) == 1 and t.stride(-2) == cols) or (t.stride(-2) == 1 and t.stride(-1) == rows)):
        return t
    if t.stride(-2) == 1 and t.stride(-1) != 1:
        return _pooled_copy(t.mT).mT
    return _pooled_copy(t)


def _pooled_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy from the extension's buffer pool (``reusable_buffer``): these copies are
    as large as a layer's activations and made every step, and fresh ones are page-faulted in."""
    from nextrec_fast.ops import reusable_buffer
    return reusable_buffer.reusable_empty(t, t.shape).copy_(t)
