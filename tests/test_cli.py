"""The benchmark command runs end to end (small config) and writes its JSON."""
import itertools
import json
import subprocess
import sys
import types

import pytest

from nextrec_fast import cli


@pytest.mark.nextrec  # against the installed nextrec, so also in the 0.6 environment's `pytest -m nextrec`
def test_bench_small_config(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "small", "--batch-size", "64", "--repeats", "1", "--warmup", "0",
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "mmoe" in table and "esmm" in table
    result = json.loads(out.read_text())
    assert {r["mode"] for r in result["rows"]} == {"forward_eval", "forward_backward", "train_step",
                                                    "train_step_fused_tables", "train_step_lazy_adam"}
    assert all(r["baseline_ms"] > 0 and r["fast_ms"] > 0 for r in result["rows"])
    # Against the installed nextrec when there is one, else the reference; the reference and the
    # fast step's GEMM floor are timed in the same loop either way.
    nextrec = result["environment"]["nextrec"]
    assert {r["baseline"] for r in result["rows"]} == {f"nextrec {nextrec}" if nextrec else "reference"}
    assert ("nextrec " + nextrec if nextrec else "the reference (no nextrec installed)") in table
    for r in result["rows"]:
        assert r["others"]["gemm_floor"]["ms"] > 0 and len(r["others"]["gemm_floor"]["samples_ms"]) == 1
        assert ("reference" in r["others"]) == bool(nextrec)
        gflop = r["gemm_gflop"]
        base = gflop["nextrec" if nextrec else "reference"]
        assert base > 0 and abs(gflop["fast"] - base) <= 0.02 * base, gflop  # the same GEMM work
    assert result["environment"]["torch"]
    # The pooling benchmark is part of the default run, at the given batch size only.
    assert "pooling of 6 sparse + 2 sequence features" in table and "embedding_bag" in table
    pooling = result["pooling"]
    assert pooling["copy_bandwidth_gbps"] > 0
    impls = {"nextrec", "fused", "embedding_bag"} if pooling["fused_available"] else {"nextrec", "embedding_bag"}
    if pooling["fused_available"] and pooling["huge_pages"]:
        impls.add("fused_4k_pages")  # some tables are large enough to be placed on huge pages
    assert {(r["batch"], r["mode"], r["impl"]) for r in pooling["rows"]} == {
        (64, mode, impl) for mode in ("forward", "forward_backward") for impl in impls}
    for r in pooling["rows"]:
        assert r["ms"] > 0 and len(r["samples_ms"]) == 1
        assert ("fraction_of_copy" in r) == (r["mode"] == "forward")


def test_bench_pooling_only(tmp_path, capsys):
    """--model pooling alone: no model rows; default batches 2048 and 8192 unless --batch-size."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", "pooling", "--config", "small", "--batch-size", "32", "--repeats", "2",
                     "--warmup", "0", "--quiet", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "speed-up" not in table and "of copy" in table
    result = json.loads(out.read_text())
    assert result["rows"] == [] and {r["batch"] for r in result["pooling"]["rows"]} == {32}
    fwd = [r for r in result["pooling"]["rows"] if r["mode"] == "forward"]
    assert all(0 < r["fraction_of_copy"] and r["forward_gbps"] > 0 for r in fwd)
    from nextrec_fast.bench import pooling as benchmark_pooling
    assert benchmark_pooling.DEFAULT_BATCHES == (2048, 8192)


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "nextrec_fast", "bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--batch-size" in proc.stdout


def test_import_never_imports_nextrec():
    code = "import sys, nextrec_fast; assert 'nextrec' not in sys.modules, 'nextrec imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr


def test_time_interleaved_bursts():
    """burst=n: one untimed call, then n timed calls per sample; functions alternate."""
    from nextrec_fast.bench.common import time_interleaved

    calls = []
    samples = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu",
                               warmup=1, repeats=2, burst=3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 2, "b": 2}
    assert "".join(calls) == "ab" + ("a" * 4 + "b" * 4) * 2
    assert all(s >= 0 for v in samples.values() for s in v)


def test_time_interleaved_settles_and_shuffles(monkeypatch):
    """settle_ms: untimed calls until that long has passed; shuffle_seed: a fresh order each round.
    The clock is simulated (each call advances it 1 ms), so no assertion depends on real time."""
    from nextrec_fast.bench import common as benchmark

    clock = {"now": 0.0}
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def run(seed):
        calls = []

        def slow(name):
            calls.append(name)
            clock["now"] += 1e-3

        fns = {n: (lambda n=n: slow(n)) for n in "abcd"}
        samples = benchmark.time_interleaved(fns, "cpu", warmup=0, repeats=1, burst=2, settle_ms=3.0,
                                             shuffle_seed=seed)
        assert {k: len(v) for k, v in samples.items()} == {n: 1 for n in "abcd"}
        assert all(v[0] == pytest.approx(1.0) for v in samples.values()), samples  # ms per timed call
        return [(name, len(list(group))) for name, group in itertools.groupby(calls)]

    orders = []
    for seed in range(6):
        blocks = run(seed)
        # One block per function: 3 untimed calls of 1 ms (settle_ms=3; one more where the float
        # sum of three 1e-3 steps falls short of 3 ms), then 2 timed ones.
        assert sorted(name for name, _ in blocks) == list("abcd") and all(n in (5, 6) for _, n in blocks), blocks
        orders.append("".join(name for name, _ in blocks))
    assert len(set(orders)) > 1, orders


@pytest.mark.parametrize("call_ms, expected", [(2.0, 10), (0.3, 64), (25.0, 1), (7.0, 3)])
def test_calls_per_sample_fill_the_minimum_sample(monkeypatch, call_ms, expected):
    """Short calls are timed in back-to-back bursts lasting MIN_SAMPLE_MS (capped), one call where
    a call is already that long; the fastest function sets the count. Simulated clock."""
    from nextrec_fast.bench import common as benchmark

    clock = {"now": 0.0}
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    calls = []

    def make(ms, name):
        def fn():
            calls.append(name)
            clock["now"] += ms / 1e3
        return fn

    fns = {"slow": make(3 * call_ms, "slow"), "fast": make(call_ms, "fast")}
    assert benchmark.MIN_SAMPLE_MS == 20.0
    assert benchmark.calls_per_sample(fns, "cpu") == expected
    assert calls == ["slow", "slow", "fast", "fast"]


def test_reliability_warnings_and_default_threads(monkeypatch):
    """A busy machine (load above the cores given) and a row whose samples spread widely are
    both reported; the default thread count is the cores the load leaves free."""
    from nextrec_fast.bench import common
    quiet = {"cores": 2, "load_at_start": 0.3, "load_at_end": 0.9}
    steady = [("mmoe fwd (fast)", [10.0, 10.5, 11.0])]
    assert common.reliability_warnings(quiet, steady) == []
    busy = common.reliability_warnings({**quiet, "load_at_end": 3.5}, steady)
    assert len(busy) == 1 and "busy" in busy[0] and "3.5" in busy[0] and "unreliable" in busy[0]
    wide = common.reliability_warnings(quiet, steady + [("ple step (reference)", [10.0, 11.0, 30.0])])
    assert len(wide) == 1 and "ple step (reference)" in wide[0] and "mmoe" not in wide[0]
    for load, cores, threads in ((0.0, 2, 2), (1.2, 2, 1), (5.0, 2, 1), (0.4, 16, 16), (6.6, 16, 9)):
        monkeypatch.setattr(common, "machine_load", lambda load=load, cores=cores: (load, cores))
        assert common.default_threads() == threads, (load, cores)


@pytest.mark.parametrize("load, busy", [(3.3, True), (1.5, False)])
def test_busy_machine_warned_before_the_run(monkeypatch, capsys, load, busy):
    """bench, profile and demo warn first, not only after the tables, when the load average
    is above the cores (a new user read the first table and never reached the last line)."""
    import torch
    from nextrec_fast import cli
    from nextrec_fast.bench import common
    monkeypatch.setattr(common, "machine_load", lambda: (load, 2))
    threads = torch.get_num_threads()
    try:
        cli._set_threads(2)  # an explicit --threads still warns
        err = capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert ("WARNING: the machine is busy" in err and f"{load:.1f}" in err) == busy, err


def test_bench_table_has_legend_spread_and_names_its_baseline():
    from nextrec_fast.bench import models
    env = {"device": "cpu", "device_name": "x", "torch": "t", "triton": None, "threads": 1, "cores": 2,
           "pooling_op": "op", "config": "small", "repeats": 3, "load_at_start": 0.1, "load_at_end": 0.2}
    row = {"model": "mmoe", "mode": "forward_eval", "batch": 8, "baseline": "reference", "baseline_ms": 2.0,
           "fast_ms": 1.0, "speedup": 2.0, "baseline_samples_ms": [1.9, 2.0, 2.2], "fast_samples_ms": [0.9, 1.0, 1.1],
           "others": {"gemm_floor": {"ms": 0.5, "samples_ms": [0.4, 0.5, 0.6]}},
           "gemm_gflop": {"fast": 1.0, "reference": 1.0}}
    table = models.format_table({"environment": env, "rows": [row]})
    assert "re-implemented" in table and "median of 3 interleaved repeats" in table
    assert "1.9-2.2" in table and "0.9-1.1" in table and "WARNING" not in table
    assert "the baseline being the reference (no nextrec installed)" in table and "2.00x" in table
    assert "0.4-0.6" in table and "fast/floor" in table and " 2.00x" in table.splitlines()[-2]
    # Against nextrec: the nextrec column is the baseline, the reference a labelled extra column.
    against = dict(row, baseline="nextrec 0.3.1", baseline_ms=4.0, speedup=4.0, baseline_samples_ms=[3.9, 4.0, 4.1],
                   others={**row["others"], "reference": {"ms": 2.0, "samples_ms": [1.9, 2.0, 2.2]}},
                   gemm_gflop={"fast": 1.0, "nextrec": 1.0})
    table = models.format_table({"environment": {**env, "nextrec": "0.3.1"}, "rows": [against]})
    line = next(l for l in table.splitlines() if l.startswith("mmoe"))
    assert "the baseline being nextrec 0.3.1 (installed)" in table
    assert line.split()[3:5] == ["4.0", "[3.9-4.1]"] and "4.00x" in line and "2.00x" in line, line
    fit = dict(row, mode="nextrec_fit_epoch", baseline="plain nextrec")
    table = models.format_table({"environment": {**env, "nextrec": "0.6.14", "steps_per_epoch": 8}, "rows": [fit]})
    assert "plain nextrec ms" in table and "accelerated ms" in table and "nextrec 0.6.14" in table


def test_bench_autocast_table_and_warning():
    """--autocast bf16: the header says so, the legend says which column runs in float32, and
    each row gives the speed-up over that float32 baseline too; a CPU that emulates bf16 is
    named in a warning (the bf16 rows would only show the emulation)."""
    from nextrec_fast.bench import models
    env = {"device": "cpu", "device_name": "x", "torch": "t", "triton": None, "threads": 1, "cores": 2,
           "pooling_op": "op", "config": "default", "repeats": 3, "load_at_start": 0.1, "load_at_end": 0.2,
           "nextrec": "0.3.1", "autocast": "bf16", "bf16_matmul_vs_fp32": 0.15}
    row = {"model": "mmoe", "mode": "forward_backward", "batch": 8, "baseline": "nextrec 0.3.1", "baseline_ms": 3.0,
           "fast_ms": 1.0, "speedup": 3.0, "baseline_samples_ms": [2.9, 3.0, 3.1], "fast_samples_ms": [0.9, 1.0, 1.1],
           "others": {"gemm_floor": {"ms": 0.5, "samples_ms": [0.5, 0.5, 0.5]},
                      "reference": {"ms": 2.0, "samples_ms": [2.0, 2.0, 2.0]},
                      "nextrec_fp32": {"ms": 5.0, "samples_ms": [4.8, 5.0, 5.2]}},
           "gemm_gflop": {"fast": 1.0, "nextrec": 1.0}}
    table = models.format_table({"environment": env, "rows": [row]})
    assert "autocast bf16" in table.splitlines()[0]
    assert "'nextrec fp32 ms'" in table and "WARNING" not in table and "the GEMM floor is those bf16 GEMMs" in table
    head = next(l for l in table.splitlines() if l.startswith("model"))
    assert "vs nextrec bf16" in head and head.endswith("vs nextrec fp32"), head
    line = next(l for l in table.splitlines() if l.startswith("mmoe"))
    assert line.split()[-3:] == ["5.0", "[4.8-5.2]", "5.00x"] and "3.00x" in line.split(), line
    emulated = models.format_table({"environment": {**env, "bf16_matmul_vs_fp32": 40.0}, "rows": [row]})
    assert "emulates bfloat16" in emulated and "40.0x slower" in emulated
    plain = models.format_table({"environment": {**env, "autocast": "none"}, "rows": [row]})
    assert "fp32" not in plain and "speed-up" in plain and "autocast" not in plain.splitlines()[0]


def test_bench_autocast_runs_the_baseline_in_float32_too(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", "esmm", "--mode", "forward_backward", "--config", "small", "--batch-size",
                     "32", "--repeats", "1", "--warmup", "0", "--quiet", "--autocast", "bf16", "--reference",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    env, (row,) = result["environment"], result["rows"]
    assert env["autocast"] == "bf16" and env["bf16_matmul_vs_fp32"] > 0
    assert row["baseline"] == "reference" and row["others"]["reference_fp32"]["ms"] > 0
    assert row["gemm_gflop"]["fast"] > 0  # the bf16 GEMMs recorded under autocast
    with pytest.raises(SystemExit):
        cli.main(["bench", "--autocast", "fp8"])
    # nextrec's own fit runs in float32: asking for both is an error, not a silent float32 run
    assert cli.main(["bench", "--nextrec", "--autocast", "bf16", "--quiet"]) == 2
