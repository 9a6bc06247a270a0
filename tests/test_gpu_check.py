"""benchmarks/gpu_check.py --dry-run-cpu: every step of the GPU script runs (on the CPU, Triton
kernels interpreted, toy sizes), so a GPU session is not spent on a bug in the script itself.
The timings it prints are meaningless; what is checked is that each row is produced."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="the dry run interprets the Triton kernels: triton is not installed (torch's CPU-only "
                           "wheels do not bring it; pip install triton to run it)")
def test_gpu_check_dry_run():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run-cpu", "--config", "small"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "FAILED" not in out, out[-4000:]
    lines = out.splitlines()
    # The interpreted expert kernel matches the per-expert PyTorch loop (fp32 in the dry run).
    err = float(next(line for line in lines if "max |fast - ref|" in line).rsplit("=", 1)[1])
    assert err < 1e-4
    for prefix in ("expert_layer eval", "expert_layer train", "gate_mixture"):
        assert any(line.startswith(prefix) for line in lines), prefix
    for model in ("mmoe", "ple", "esmm"):
        for dtype in ("bfloat16", "float32"):
            for mode in ("forward_eval", "train_step"):
                assert any(line.startswith(f"{model} {dtype} B=32 {mode} fast") for line in lines), (model, dtype, mode)
