"""Compile every Triton kernel for a GPU architecture, without a GPU.

The interpreter (TRITON_INTERPRET=1, the CPU tests) runs the kernels' Python semantics but never
lowers them: it cannot catch what only the GPU compiler rejects (tl.dot shapes and dtypes,
layouts, unsupported math in a dtype) nor show registers, spills and shared memory. This script
runs the kernels' own launchers (``nextrec_fast.kernels``) on CPU tensors with a compile-only
Triton driver: every launch, and every autotune config, goes through Triton's real compiler for
the target (``--arch 90``: H100) down to a cubin, and nothing is launched. Then it reads each
cubin's resource usage with the ``cuobjdump`` that ships with Triton.

    python benchmarks/triton_compile_check.py                 # sm_90, every config (a few minutes)
    python benchmarks/triton_compile_check.py --quick         # first config of each space
    python benchmarks/triton_compile_check.py --arch 80 --json compile.json   # A100

Exit status 1 if any kernel fails to compile. Flags (not failures): register spills, and configs
whose shared memory exceeds the architecture's per-block limit (the autotuner skips those at run
time, so they only cost compile time).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: must precede importing the kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner, driver, jit  # noqa: E402

# Max dynamic shared memory per block (bytes) by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class CompileOnlyDriver:
    """Just enough of a Triton driver for JITFunction.run(warmup=True): a target, no device."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class Recorder:
    """Patches JITFunction.run to compile only, and Autotuner.run to compile every config it
    would time (or the first)."""

    def __init__(self, all_configs: bool):
        self.all_configs = all_configs  # per case: whether its autotune spaces are swept
        self.case = ""
        self.rows: list[dict] = []
        self._seen: set = set()

    def install(self):
        original_run = jit.JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            start = time.perf_counter()
            kernel = original_run(fn, *args, grid=grid, warmup=True, **kwargs)
            meta = {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in kwargs.items()
                    if k.isupper() or k in ("num_warps", "num_stages")}
            key = (fn.__name__, json.dumps(meta, sort_keys=True), recorder.case)
            if key not in recorder._seen:
                recorder._seen.add(key)
                recorder.rows.append({"case": recorder.case, "kernel": fn.__name__, "meta": meta, "compiled": kernel,
                                      "seconds": time.perf_counter() - start})
            return kernel

        def autotuned_run(tuner, *args, **kwargs):
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            # The configs the autotuner would time for this call (after its early pruning).
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            configs = configs if recorder.all_configs else configs[:1]
            for config in configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs(), grid=None, warmup=True)

        jit.JITFunction.run = run
        autotuner.Autotuner.run = autotuned_run


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for field in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{field}:(\d+)", out)
        if m:
            usage[field.lower()] = int(m.group(1))
    return usage


def cases(quick: bool):
    """(name, thunk, sweep) triples: each thunk calls one launcher on CPU tensors of a typical
    shape; sweep: compile every config of its autotune spaces (else the first only: the
    activation variants change the epilogue, not the tiling)."""
    from nextrec_fast.kernels import activations as act
    from nextrec_fast.kernels import batchnorm as bn
    from nextrec_fast.kernels import expert_linear as el
    from nextrec_fast.kernels import gate_mixture as gm

    E, B, K, N, G = 4, 256, 96, 64, 2
    all_acts = sorted(act.ACTIVATION_IDS.items(), key=lambda kv: kv[1])
    act_ids = sorted({v for _, v in all_acts})
    dtypes = ["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16", "fp64"]
    for dname in dtypes:
        dt = DTYPES[dname]

        def t(*shape, dt=dt):
            return torch.randn(*shape).to(dt)

        seed = torch.zeros(1, dtype=torch.int64)
        x, w, b = t(B, K), t(E, N, K), t(E, N)
        xg, group = t(G, B, K), torch.tensor([0, 0, 1, 1], dtype=torch.int32)
        ch = [t(E, N) for _ in range(3)]
        prelu = t(1)
        # Expert GEMM forward: eval (BN folded) with every activation on the first config;
        # the common variants on every config.
        for a in (act_ids if not quick or dname == "fp32" else [act.RELU.value]):
            yield f"linear_fwd eval act={a}|{dname}", lambda a=a: el.expert_linear_forward(
                x, w, b, bn_center=ch[0], bn_scale=ch[1], bn_shift=ch[2],
                prelu_weight=prelu if a == act.PRELU.value else None, activation=a), a == act.RELU.value
        yield f"linear_fwd train-stats|{dname}", lambda: el.expert_linear_forward(
            x, w, b, write_y=False, write_z=True, write_stats=True), True
        yield f"linear_fwd indexed dropout|{dname}", lambda: el.expert_linear_forward(
            xg, w, b, group, seed=seed, activation=act.RELU.value, dropout_p=0.1, write_z=True), True
        yield f"linear_dx shared|{dname}", lambda: el.expert_linear_backward_input(
            t(E, B, N), w, 1, B, K, mode=0), True
        yield f"linear_dx per-expert|{dname}", lambda: el.expert_linear_backward_input(
            t(E, B, N), w, E, B, K, mode=1), True
        yield f"linear_dx grouped|{dname}", lambda: el.expert_linear_backward_input(
            t(E, B, N), w, G, B, K, mode=2, group_start=torch.tensor([0, 2, 4], dtype=torch.int32),
            group_experts=torch.arange(E, dtype=torch.int32)), True
        yield f"linear_dw shared|{dname}", lambda: el.expert_linear_backward_weight(t(E, B, N), x), True
        yield f"linear_dw indexed split|{dname}", lambda: el.expert_linear_backward_weight(
            t(E, B, N), xg, group, batch_splits=2), True
        # BatchNorm + activation (+ dropout) passes: every activation.
        z = t(E, B, N)
        stat = torch.float64 if dt == torch.float64 else torch.float32
        center, invstd = torch.randn(E, N).to(stat), torch.rand(E, N).to(stat) + 0.5
        for a in (act_ids if not quick or dname == "fp32" else [act.RELU.value]):
            p = prelu if a == act.PRELU.value else None
            yield f"normalize_activate act={a}|{dname}", lambda a=a, p=p: bn.normalize_activate(
                z, ch[0], ch[1], ch[2], prelu_weight=p, seed=seed, activation=a, dropout_p=0.1), False
            yield f"bn_act_backward train act={a}|{dname}", lambda a=a, p=p: bn.bn_activation_backward(
                t(E, B, N), z, center=center, invstd=invstd, gamma=ch[1], beta=ch[2], bn_training=True,
                prelu_weight=p, seed=seed, activation=a, dropout_p=0.1), False
            yield f"bn_act_backward eval act={a}|{dname}", lambda a=a, p=p: bn.bn_activation_backward(
                t(E, B, N), z, center=center, invstd=invstd, gamma=ch[1], beta=ch[2], prelu_weight=p, activation=a), False
        yield f"act_backward no-bn|{dname}", lambda: bn.bn_activation_backward(
            t(E, B, N), z, activation=act.RELU.value), False
        # Gate mixture: all experts (MMoE) and PLE's subsets.
        T, D = 2, 64
        experts = t(E, B, D)
        for label, index, S in (("identity", None, E), ("subset", torch.tensor([[0, 1, 2], [0, 1, 3]]), 3)):
            logits = t(T, B, S)
            yield f"gate_fwd {label}|{dname}", lambda lg=logits, i=index: gm.gate_mixture_forward(
                lg, experts, i), True
            yield f"gate_bwd {label}|{dname}", lambda lg=logits, i=index: gm.gate_mixture_backward(
                t(T, B, D), lg, experts, i), True


def check(arch: int, quick: bool, all_configs: bool, verbose: bool, only: str | None = None) -> dict:
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    recorder = Recorder(all_configs)
    recorder.install()
    failures = []
    for name, thunk, sweep in cases(quick):
        if only and only not in name:
            continue
        recorder.case = name
        recorder.all_configs = all_configs and sweep
        try:
            thunk()
        except Exception as e:  # noqa: BLE001 - reported per case
            msg = "".join(traceback.format_exception_only(type(e), e)).strip()
            failures.append({"case": name, "error": msg[-2000:]})
            if verbose:
                print(f"FAIL {name}: {msg[-400:]}", flush=True)
    limit = SHARED_LIMIT.get(arch)
    rows = []
    for r in recorder.rows:
        k = r.pop("compiled")
        usage = resource_usage(k.asm["cubin"]) if "cubin" in k.asm else {}
        shared = int(k.metadata.shared)
        r.update(shared=shared, regs=usage.get("reg"), spill_bytes=usage.get("local", 0) + usage.get("stack", 0),
                 over_shared_limit=bool(limit and shared > limit))
        rows.append(r)
    return {"arch": arch, "triton": triton.__version__, "kernels_compiled": len(rows), "failures": failures,
            "spilling": [r for r in rows if r["spill_bytes"]], "over_shared_limit": [r for r in rows if r["over_shared_limit"]],
            "rows": rows}


def summary(result: dict) -> str:
    lines = [f"sm_{result['arch']} (triton {result['triton']}): {result['kernels_compiled']} kernels compiled, "
             f"{len(result['failures'])} failures, {len(result['spilling'])} spilling, "
             f"{len(result['over_shared_limit'])} over the shared-memory limit"]
    by_kernel: dict[str, list] = {}
    for r in result["rows"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for name, rs in sorted(by_kernel.items()):
        regs = [r["regs"] for r in rs if r["regs"] is not None]
        lines.append(f"  {name:<36} {len(rs):>3} variants  regs {min(regs, default=0)}-{max(regs, default=0)}  "
                     f"shared <= {max(r['shared'] for r in rs) // 1024} KiB  "
                     f"compile {sum(r['seconds'] for r in rs):.0f} s")
    for r in result["spilling"]:
        lines.append(f"  spills {r['spill_bytes']} B: {r['kernel']} {r['case']} {r['meta']}")
    for r in result["over_shared_limit"]:
        lines.append(f"  over shared limit ({r['shared']} B): {r['kernel']} {r['case']} "
                     f"BLOCK={[r['meta'].get(k) for k in ('BLOCK_M', 'BLOCK_N', 'BLOCK_K')]} stages={r['meta'].get('num_stages')}")
    for f in result["failures"]:
        lines.append(f"  FAILED {f['case']}: {f['error'].splitlines()[-1][:300]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # One architecture per process: Triton caches the target per device on first use.
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default: 90, H100)")
    parser.add_argument("--quick", action="store_true", help="first config of each autotune space, fp32 and bf16")
    parser.add_argument("--json", help="write the per-kernel rows here")
    parser.add_argument("--only", help="cases whose name contains this (e.g. linear_fwd, bn_act, |bf16)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    result = check(args.arch, quick=args.quick, all_configs=not args.quick, verbose=args.verbose, only=args.only)
    print(summary(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
