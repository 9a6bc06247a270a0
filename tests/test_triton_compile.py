"""Every Triton kernel compiles for the H100 (sm_90) with Triton's real compiler, without a GPU.

The interpreter tests check what the kernels compute; this checks what only the GPU compiler
sees: lowering of tl.dot in each dtype and layout, every activation's math in the epilogues, and
the register and shared-memory budget. It runs benchmarks/triton_compile_check.py --quick in a
subprocess (the kernels must be imported without TRITON_INTERPRET, which conftest sets here):
the first config of every autotune space, fp32 and bf16, every activation in fp32. About 2-3
minutes on 2 cores; the full sweep (every config, fp16 and fp64 too) is the script's default.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_compile_check.py"


def _nvidia_backend_available() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - no triton, or a build without the CUDA backend
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton with its NVIDIA backend is not installed")
def test_all_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # really compile, not a cache hit
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["failures"], result["failures"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {r["kernel"] for r in result["rows"]}
    assert kernels == {
        "_expert_linear_fwd_kernel", "_expert_linear_dx_kernel", "_expert_linear_dw_kernel",
        "_normalize_activate_kernel", "_bn_activation_backward_kernel",
        "_gate_mixture_fwd_kernel", "_gate_mixture_logits_grad_kernel", "_gate_mixture_experts_grad_kernel"}
    # Every activation reached the GEMM epilogue and both BatchNorm passes (fp32).
    from nextrec_fast.kernels.activations import ACTIVATION_IDS
    acts = set(ACTIVATION_IDS.values())
    for kernel in ("_expert_linear_fwd_kernel", "_normalize_activate_kernel", "_bn_activation_backward_kernel"):
        seen = {r["meta"].get("ACT") for r in result["rows"] if r["kernel"] == kernel and r["case"].endswith("|fp32")}
        assert acts <= seen, (kernel, sorted(acts - seen))
    assert not result["over_shared_limit"]
    # The autotuner's pruning picks the space by path: FMA tiles for fp32 without TF32 (torch's
    # default), tensor-core tiles for bf16 (first config of each: 8 warps vs 4).
    for r in result["rows"]:
        if r["kernel"] == "_expert_linear_fwd_kernel" and r["case"].startswith("linear_fwd eval"):
            assert r["meta"]["num_warps"] == (8 if r["case"].endswith("|fp32") else 4), r
    # Register budget (tiles were sized for it): the elementwise BatchNorm passes, and the first
    # config of each GEMM space (tensor-core for bf16, FMA for fp32 without TF32), spill at most a
    # few bytes, as measured when the tiles were chosen.
    for r in result["rows"]:
        assert r["spill_bytes"] <= 64, r
