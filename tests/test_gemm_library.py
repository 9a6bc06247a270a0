"""Which library runs the fast path's float32 CPU GEMMs (``nextrec_fast.ops.dense_gemm``): the
routing rule, and the reason given where oneDNN cannot take them. Runs on every CPU; the GEMMs
themselves are tested in test_onednn_gemm.py (skipped where oneDNN is not reachable)."""
import os
import platform

import pytest
import torch

from nextrec_fast import _extension
from nextrec_fast.ops import dense_gemm

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_routing_follows_the_setting_and_the_cpu_vendor(monkeypatch):
    """``NEXTREC_FAST_ONEDNN_GEMM`` "1" / "0" decide; unset, every vendor but Intel gets oneDNN."""
    cases = [("1", "GenuineIntel", True), ("0", "AuthenticAMD", False), (None, "GenuineIntel", False),
             (None, "AuthenticAMD", True), ("auto", "AuthenticAMD", True), (None, "", True)]
    for setting, vendor, expected in cases:
        if setting is None:
            monkeypatch.delenv("NEXTREC_FAST_ONEDNN_GEMM", raising=False)
        else:
            monkeypatch.setenv("NEXTREC_FAST_ONEDNN_GEMM", setting)
        monkeypatch.setattr(dense_gemm, "cpu_vendor", lambda v=vendor: v)
        dense_gemm.routed.cache_clear()
        assert dense_gemm.routed() is expected, (setting, vendor)
    monkeypatch.setenv("NEXTREC_FAST_ONEDNN_GEMM", "off")  # not a setting: a warning, then the rule
    monkeypatch.setattr(dense_gemm, "cpu_vendor", lambda: "GenuineIntel")
    dense_gemm.routed.cache_clear()
    with pytest.warns(UserWarning, match="not 0, 1 or auto"):
        assert dense_gemm.routed() is False
    monkeypatch.undo()
    dense_gemm.routed.cache_clear()
    assert dense_gemm.float32_library() == ("oneDNN" if dense_gemm._onednn_on() else "torch.mm")
    if X86 and os.path.exists("/proc/cpuinfo"):  # Linux names an x86 CPU's vendor
        assert dense_gemm.cpu_vendor(), "vendor_id not read from /proc/cpuinfo"


def test_unavailable_reason_names_the_cause(monkeypatch):
    """None exactly where oneDNN is reachable; otherwise a cause a user can act on: the setting,
    or (mocked here) a CPU without AVX-512, PyTorch's condition for float32 oneDNN matmuls."""
    assert (dense_gemm.unavailable_reason() is None) == dense_gemm.is_available()
    try:
        monkeypatch.setenv("NEXTREC_FAST_ONEDNN_GEMM", "0")
        dense_gemm.unavailable_reason.cache_clear()
        assert not dense_gemm.is_available()
        assert dense_gemm.unavailable_reason() == "NEXTREC_FAST_ONEDNN_GEMM=0"
        monkeypatch.delenv("NEXTREC_FAST_ONEDNN_GEMM")
        if _extension.is_available() and torch.backends.mkldnn.is_available() and X86:
            monkeypatch.setattr(dense_gemm, "_onednn_runs_float32", lambda: False)  # the probe refuses
            monkeypatch.setattr(dense_gemm, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma"}))
            dense_gemm.unavailable_reason.cache_clear()
            assert not dense_gemm.is_available()
            assert "AVX-512" in dense_gemm.unavailable_reason()
            monkeypatch.setattr(dense_gemm, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
            dense_gemm.unavailable_reason.cache_clear()
            assert "refused" in dense_gemm.unavailable_reason()
    finally:
        monkeypatch.undo()
        dense_gemm.unavailable_reason.cache_clear()
    if X86 and os.path.exists("/proc/cpuinfo"):
        assert "sse2" in dense_gemm.cpu_flags(), "flags not read from /proc/cpuinfo"
