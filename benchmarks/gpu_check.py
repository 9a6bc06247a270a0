"""One-shot GPU check of the Triton expert-layer / gate-mixture ops (target: < 4 min on an H100).

1. the kernel tests on CUDA (pytest, TRITON_INTERPRET off, one config per kernel);
2. bf16 / fp32 matmul peak (torch.matmul 8192^2, triton.testing.do_bench);
3. expert_layer, 8 experts, batch 65536, 512 -> 256, bf16: eval (GEMM + bias + folded BN +
   relu) against the per-expert PyTorch loop, with TFLOP/s and % of the measured bf16 peak;
   train mode (batch-stat BN + relu) forward + backward;
4. gate_mixture forward + backward at T=2, E=8, B=8192, D=128;
5. whole models (default config of `nextrec-fast bench`, batch 8192, bf16 and fp32): forward (eval)
   and training step (forward + backward + Adam) of the reference (eager and torch.compile) and the
   fast model (eager), which runs the C++/CUDA pooling op and the Triton kernels.
Prints one table. Usage: python benchmarks/gpu_check.py [--skip-tests] [--test-timeout SECONDS]
[--models mmoe ple esmm] [--compile-models mmoe] (gpu_check.sh rebuilds the extension first).

``--dry-run-cpu`` runs the same code on the CPU at toy sizes, the Triton kernels under the
interpreter (forced with the ``triton`` backend), plain timers instead of do_bench, no tests and no
torch.compile: the numbers mean nothing, but every step of the script runs, so a GPU session is
not spent finding a bug in the script itself (tests/test_gpu_check.py runs it in CI).
"""
import argparse
import os
import subprocess
import sys
import time

DRY_RUN = "--dry-run-cpu" in sys.argv
# Compiled kernels, not the interpreter: must hold before triton / the kernels are imported.
# ("0" rather than unset: tests/conftest.py turns the interpreter on when the variable is unset.)
os.environ["TRITON_INTERPRET"] = "1" if DRY_RUN else "0"
if DRY_RUN:
    os.environ["NEXTREC_FAST_BACKEND"] = "triton"  # the Triton kernels on CPU tensors (interpreted)
DEVICE = "cpu" if DRY_RUN else "cuda"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Kernel-level rows in bf16 on the GPU; fp32 in the dry run, where the error check is then tight
# (the models still run bf16 there).
KERNEL_DTYPE = torch.float32 if DRY_RUN else torch.bfloat16
KDT = "fp32" if DRY_RUN else "bf16"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A CUDA subset that compiles quickly: every feature, a few activations.
TEST_SELECTION = (
    "cuda and not inductor and (matches_reference or bf16 or gradcheck or dropout or gate_mixture or widths "
    "or batch_one or multi_block or large_mean or running_stats or weight_grad or opcheck or aot_eager or profiler "
    "or rejects or (every_activation and (relu or gelu or prelu or mish or softplus or hardswish)) "
    "or (extremes and float32))"
)


def run_tests(timeout_s: int) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0", NEXTREC_FAST_AUTOTUNE="0")
    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "test_triton_kernels.py"), "-q",
           "-p", "no:cacheprovider", "-k", TEST_SELECTION]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(partial[-3000:])
        return f"TIMEOUT after {timeout_s}s (partial output above)"
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    print("\n".join(tail[-25:]))
    summary = tail[-1] if tail else proc.stderr[-500:]
    return f"rc={proc.returncode} in {time.time() - start:.0f}s: {summary}"


def bench(fn, warmup=10, rep=50):
    """Median ms (do_bench's rep/warmup are in ms; the dry run calls fn twice after one warm-up)."""
    if DRY_RUN:
        fn()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep)


def matmul_peak(dtype, n=8192):
    n = 256 if DRY_RUN else n
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = bench(lambda: torch.matmul(a, b), warmup=5, rep=30)
    return 2 * n**3 / (ms * 1e-3) / 1e12, n


def expert_inputs(E, B, K, N, dtype, requires_grad=False):
    dev = DEVICE
    x = torch.randn(B, K, device=dev, dtype=dtype)
    w = (torch.randn(E, N, K, device=dev, dtype=dtype) / K**0.5)
    b = torch.randn(E, N, device=dev, dtype=dtype) * 0.1
    gamma = 1 + 0.1 * torch.randn(E, N, device=dev, dtype=dtype)
    beta = 0.1 * torch.randn(E, N, device=dev, dtype=dtype)
    rm = 0.1 * torch.randn(E, N, device=dev, dtype=dtype)
    rv = 1 + 0.1 * torch.rand(E, N, device=dev, dtype=dtype)
    params = [x, w, b, gamma, beta]
    for t in params:
        t.requires_grad_(requires_grad)
    return x, w, b, gamma, beta, rm, rv


def reference_layer(x, w, b, gamma, beta, rm, rv, training):
    """nextrec's MLP hidden layer per expert (Linear -> BatchNorm1d -> ReLU)."""
    outs = []
    for e in range(w.shape[0]):
        z = F.linear(x, w[e], b[e])
        if training:
            z = F.batch_norm(z, None, None, gamma[e], beta[e], training=True)
        else:
            z = F.batch_norm(z, rm[e], rv[e], gamma[e], beta[e], training=False)
        outs.append(F.relu(z))
    return torch.stack(outs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=int, default=140)
    parser.add_argument("--models", nargs="*", default=["mmoe", "ple", "esmm"])
    parser.add_argument("--compile-models", nargs="*", default=["mmoe"],
                        help="models whose reference is also timed under torch.compile (compiling is slow)")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--config", choices=["default", "small"], default="default",
                        help="model features (nextrec-fast bench's configs)")
    parser.add_argument("--dry-run-cpu", action="store_true", help="see the module docstring")
    args = parser.parse_args()
    if DRY_RUN:
        args.skip_tests, args.compile_models, args.batch_size = True, [], min(args.batch_size, 32)
    else:
        assert torch.cuda.is_available(), "gpu_check needs a CUDA device (or --dry-run-cpu)"
    # The installed package (gpu_check.sh installs it): the source tree's nextrec_fast lacks the
    # kernels subpackage, which installation maps from kernels/.
    from nextrec_fast.ops.triton_ops import expert_layer, gate_mixture

    rows = []  # (name, fast ms, reference ms, TFLOP/s, % of peak)
    device_name = "CPU dry run (interpreter; timings meaningless)" if DRY_RUN else torch.cuda.get_device_name()
    print(f"device: {device_name} | torch {torch.__version__}")
    test_summary = "skipped" if args.skip_tests else run_tests(args.test_timeout)

    peak_bf16, n = matmul_peak(torch.bfloat16)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    peak_fp32, _ = matmul_peak(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak_tf32, _ = matmul_peak(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    rows.append((f"matmul {n}^2 bf16 (peak)", None, None, peak_bf16, 100.0))
    rows.append((f"matmul {n}^2 fp32 strict (peak)", None, None, peak_fp32, None))
    rows.append((f"matmul {n}^2 fp32 tf32", None, None, peak_tf32, None))

    E, B, K, N = (2, 64, 32, 16) if DRY_RUN else (8, 65536, 512, 256)
    flops = 2 * E * B * K * N
    x, w, b, gamma, beta, rm, rv = expert_inputs(E, B, K, N, KERNEL_DTYPE)
    with torch.no_grad():
        fast_eval = lambda: expert_layer(x, w, b, bn_weight=gamma, bn_bias=beta, bn_running_mean=rm,
                                         bn_running_var=rv, activation="relu")[0]
        ref_eval = lambda: reference_layer(x, w, b, gamma, beta, rm, rv, training=False)
        t0 = time.time()
        y_fast = fast_eval()  # autotunes
        tune_s = time.time() - t0
        err = (y_fast.float() - ref_eval().float()).abs().max().item()
        ms_fast, ms_ref = bench(fast_eval), bench(ref_eval)
    tflops = flops / (ms_fast * 1e-3) / 1e12
    rows.append((f"expert_layer eval {KDT} E={E} B={B} {K}->{N}", ms_fast, ms_ref, tflops, 100 * tflops / peak_bf16))
    print(f"eval: autotune {tune_s:.1f}s, max |fast - ref| = {err:.3g}")

    x, w, b, gamma, beta, rm, rv = expert_inputs(E, B, K, N, KERNEL_DTYPE, requires_grad=True)
    params = [x, w, b, gamma, beta]
    grad_y = torch.randn(E, B, N, device=DEVICE, dtype=KERNEL_DTYPE)

    def fast_train():
        y, _, _ = expert_layer(x, w, b, bn_weight=gamma, bn_bias=beta, bn_training=True, activation="relu")
        return torch.autograd.grad(y, params, grad_y)

    def ref_train():
        y = reference_layer(x, w, b, gamma, beta, None, None, training=True)
        return torch.autograd.grad(y, params, grad_y)

    t0 = time.time()
    fast_train()
    tune_s = time.time() - t0
    ms_fast, ms_ref = bench(fast_train, rep=30), bench(ref_train, rep=30)
    tflops = 3 * flops / (ms_fast * 1e-3) / 1e12  # forward + dX + dW GEMMs
    rows.append((f"expert_layer train {KDT} fwd+bwd", ms_fast, ms_ref, tflops, 100 * tflops / peak_bf16))
    print(f"train: autotune {tune_s:.1f}s")
    del x, w, b, gamma, beta, rm, rv, params, grad_y

    T, GE, GB, D = (2, 4, 64, 16) if DRY_RUN else (2, 8, 8192, 128)
    logits = torch.randn(T, GB, GE, device=DEVICE, dtype=KERNEL_DTYPE, requires_grad=True)
    experts = torch.randn(GE, GB, D, device=DEVICE, dtype=KERNEL_DTYPE, requires_grad=True)
    grad_out = torch.randn(T, GB, D, device=DEVICE, dtype=KERNEL_DTYPE)

    def fast_gate():
        return torch.autograd.grad(gate_mixture(logits, experts), [logits, experts], grad_out)

    def ref_gate():
        # MMoE's formulation: softmax gate, weighted sum over stacked experts.
        out = torch.einsum("tbs,sbd->tbd", torch.softmax(logits, dim=-1), experts)
        return torch.autograd.grad(out, [logits, experts], grad_out)

    fast_gate()
    ms_fast, ms_ref = bench(fast_gate), bench(ref_gate)
    rows.append((f"gate_mixture {KDT} T={T} E={GE} B={GB} D={D} fwd+bwd", ms_fast, ms_ref, None, None))

    rows += model_rows(args.models, args.compile_models, args.batch_size, args.config)

    print()
    print(f"{'case':<48} {'fast ms':>9} {'ref ms':>9} {'speedup':>8} {'TFLOP/s':>9} {'% peak':>7}")
    for name, fast, ref, tf, pct in rows:
        cells = [f"{fast:9.3f}" if fast is not None else f"{'':>9}",
                 f"{ref:9.3f}" if ref is not None else f"{'':>9}",
                 f"{ref / fast:7.2f}x" if fast and ref else f"{'':>8}",
                 f"{tf:9.1f}" if tf is not None else f"{'':>9}",
                 f"{pct:6.1f}%" if pct is not None else f"{'':>7}"]
        print(f"{name:<48} " + " ".join(cells))
    print(f"tests: {test_summary}")


# Dry run: the same model structure with small experts (the interpreter runs every program).
TINY_MODELS = {
    "mmoe": dict(expert_params={"dims": [16, 8]}, num_experts=3),
    "ple": dict(shared_expert_params={"dims": [16, 8]}, specific_expert_params={"dims": [16, 8]}),
    "esmm": dict(ctr_params={"dims": [16, 8]}, cvr_params={"dims": [16, 8]}),
}


def model_rows(models, compile_models, batch, config="default"):
    """(name, fast ms, reference ms, None, None) rows; compiled-reference rows put the compiled
    reference in the 'fast' column so the speed-up column reads reference / compiled."""
    from nextrec_fast.bench import common
    from nextrec_fast.bench import models as benchmark
    rows = []
    features = common.default_features(**common.CONFIGS[config])
    for dtype in (torch.bfloat16, torch.float32):
        for model in models:
            ref, fast = benchmark.build_models(model, DEVICE, features=features,
                                               overrides=TINY_MODELS[model] if DRY_RUN else None)
            ref.to(dtype)
            fast.to(dtype)
            x, labels = common.make_batch(ref.dense_features, ref.sparse_features, ref.sequence_features,
                                             batch=batch, device=DEVICE)
            x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
            labels = labels.to(dtype)
            tag = f"{model} {str(dtype).replace('torch.', '')} B={batch}"
            impls = {"ref": ref, "fast": fast}
            if model in compile_models:
                impls["compiled ref"] = torch.compile(ref)
            timings = {}
            for mode in ("forward_eval", "train_step"):
                for name, module in impls.items():
                    step = benchmark._step_fn(module, mode, x, labels)
                    try:
                        step()  # warm-up: compiles / autotunes
                        timings[(mode, name)] = bench(step, warmup=3, rep=20)
                    except Exception as exc:  # keep the table: one failing case must not hide the rest
                        print(f"{tag} {mode} {name}: FAILED {type(exc).__name__}: {exc}")
                ms_ref = timings.get((mode, "ref"))
                if (mode, "fast") in timings:
                    rows.append((f"{tag} {mode} fast", timings[(mode, "fast")], ms_ref, None, None))
                if (mode, "compiled ref") in timings:
                    rows.append((f"{tag} {mode} compiled ref", timings[(mode, "compiled ref")], ms_ref, None, None))
            del ref, fast, impls, x
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
