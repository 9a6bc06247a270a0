"""Shared machinery of the pytest-benchmark suite: sizes, implementations, timing + peak memory.

Every case is parametrised by implementation (``reference`` = nextrec's computation,
``compiled_reference`` = ``torch.compile`` of it, ``fast`` = nextrec_fast, plus per-family extras)
and by size (``small``: seconds-long smoke sizes; ``default``: the ``nextrec-fast bench`` default
config at batch 2048, marked ``default_size``). Implementations of one case share a
``benchmark.group`` so pytest-benchmark prints them side by side; ``check_ratios.py`` compares
their fast/reference ratios within one run against the stored baseline.

Peak memory goes to ``benchmark.extra_info`` (see ``nextrec_fast.bench.profiling.measure_peak_memory``):
on CUDA ``max_memory_allocated`` above the memory held before one call; on CPU the peak of the
running total of allocations minus frees during one call, from the profiler's memory events.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import pytest
import torch

from nextrec_fast.bench import common
from nextrec_fast.bench import models as bench
from nextrec_fast.backend import use_backend
from nextrec_fast.bench.profiling import measure_peak_memory


@dataclass(frozen=True)
class Size:
    name: str
    config: str   # key of nextrec_fast.bench.common.CONFIGS
    batch: int
    rounds: int   # timed rounds per case (--bench-rounds overrides)


SIZES = {
    "small": Size("small", "small", batch=256, rounds=15),
    "default": Size("default", "default", batch=2048, rounds=5),
}

# `-m "not default_size"` (the CI short mode) keeps only the small sizes.
SIZE_PARAMS = [pytest.param("small", id="small"),
               pytest.param("default", id="default", marks=pytest.mark.default_size)]


def pytest_addoption(parser):
    group = parser.getgroup("nextrec_fast benchmarks")
    group.addoption("--bench-device", default=None,
                    help="cpu or cuda (default: cuda when available, else cpu)")
    group.addoption("--bench-rounds", type=int, default=0,
                    help="timed rounds per case (default: 15 for small sizes, 5 for default sizes)")
    group.addoption("--bench-threads", type=int, default=0,
                    help="torch.set_num_threads for the run (default: leave as is). Use 1 on a shared CPU "
                         "machine: oversubscribed OpenMP threads make timings 10-100x slower and erratic")
    group.addoption("--bench-compile", action="store_true",
                    help="also run compiled_reference and compiled_fast on CPU (torch.compile takes ~20-60 s per case there)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "default_size: the bench's default config at batch 2048 (slow on CPU)")
    # pyproject's addopts contain --benchmark-disable (so plain `pytest` runs tests only), which
    # pytest-benchmark refuses to combine with --benchmark-only: --benchmark-only means "enable".
    if config.getoption("benchmark_only", False) and not config.getoption("benchmark_enable", False):
        config.option.benchmark_enable = True
    if config.getoption("--bench-threads", 0):
        torch.set_num_threads(config.getoption("--bench-threads"))


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but CUDA is not available")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    # Every benchmark taking `size` runs at both sizes; test modules import nothing from here.
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", SIZE_PARAMS, indirect=True)


@pytest.fixture
def size(request) -> Size:
    return SIZES[request.param]


MIN_ROUND_S = 0.005  # shortest timed round


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def compile_or_skip(device, pytestconfig):
    """``torch.compile(fn)``, or skip the case on CPU unless --bench-compile: inductor's C++
    codegen takes tens of seconds per case on CPU, far beyond the short mode's budget."""
    def compile_fn(fn, **options):
        if device.type == "cpu" and not pytestconfig.getoption("--bench-compile"):
            pytest.skip("torch.compile on CPU takes ~20-60 s per case: pass --bench-compile to include it")
        return torch.compile(fn, **options)
    return compile_fn


@pytest.fixture
def torch_backend_or_skip(device):
    """``fn`` run with nextrec_fast's ``torch`` backend (no Triton, no C++ op): on CUDA it shows
    what the custom kernels add over batched PyTorch. Skipped on CPU, where the only difference
    is the C++ pooling op, already isolated by the embedding benchmark."""
    def wrap(fn):
        if device.type != "cuda":
            pytest.skip("fast_torch differs from fast only on CUDA (Triton kernels); see test_bench_embedding for the C++ op")

        def run(*args, **kwargs):
            with use_backend("torch"):
                return fn(*args, **kwargs)
        return run
    return wrap


@pytest.fixture
def run_case(benchmark, device, size, pytestconfig):
    """``run_case(fn, group=..., impl=..., **extra_info)``: time ``fn`` (one call = one round)
    and record its peak memory beside the time.

    One untimed call first (it also compiles ``compiled_reference`` and allocates optimiser
    state), one call under the memory probe, then the timed rounds.
    """
    def run(fn, *, group: str, impl: str, **info):
        def call():
            fn()
            _sync(device)

        benchmark.group = f"{group} [{size.name}]"
        start = time.perf_counter()
        call()
        first_call_s = time.perf_counter() - start
        memory = measure_peak_memory(fn, device)
        benchmark.extra_info.update(
            impl=impl, size=size.name, batch=size.batch, device=str(device), threads=torch.get_num_threads(),
            peak_memory_bytes=memory.peak_bytes, peak_memory_mb=round(memory.peak_bytes / 2**20, 3),
            allocated_bytes=memory.allocated_bytes, memory_method=memory.method, **info)
        rounds = pytestconfig.getoption("--bench-rounds") or size.rounds
        # Calls shorter than MIN_ROUND_S repeat within a round (pytest-benchmark reports per-call
        # times), so one scheduler hiccup on a busy machine does not decide a round. A compiled
        # function's first call includes compilation: long, so one iteration, as it should be.
        iterations = max(1, min(100, math.ceil(MIN_ROUND_S / max(first_call_s, 1e-6))))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=0, iterations=iterations)  # warmed up above
        _RESULTS.append(benchmark)
    return run


# -- side-by-side summary: time AND memory of every implementation against the reference ---------

_RESULTS: list = []


def pytest_terminal_summary(terminalreporter, config):
    """pytest-benchmark's tables show time only; this one puts the peak memory beside it."""
    rows = [b for b in _RESULTS if getattr(b, "stats", None) is not None]
    if not rows:
        return
    groups: dict = {}
    for b in rows:
        groups.setdefault(b.group, {})[b.extra_info["impl"]] = b
    write = terminalreporter.write_line
    terminalreporter.section("nextrec_fast: implementations side by side (vs nextrec where it ran, else the "
                             "reference, in the same run)")
    write(f"{'group':<40} {'impl':<19} {'min ms':>9} {'median ms':>10} {'speed-up':>9} "
          f"{'peak MB':>9} {'mem vs ref':>10}")
    order = ("nextrec", "accelerated", "reference", "compiled_reference", "fast", "compiled_fast", "fast_torch")
    for group, impls in groups.items():
        ref = impls.get("nextrec") or impls.get("reference")
        for impl, b in sorted(impls.items(), key=lambda item: (order + (item[0],)).index(item[0])):
            stats = b.stats.stats
            speedup = f"{ref.stats.stats.min / stats.min:.2f}x" if ref is not None and stats.min else "-"
            peak, ref_peak = b.extra_info["peak_memory_bytes"], ref.extra_info["peak_memory_bytes"] if ref else 0
            memory = f"{peak / ref_peak:.2f}x" if ref_peak else "-"
            write(f"{group:<40} {impl:<19} {stats.min * 1e3:>9.3f} {stats.median * 1e3:>10.3f} {speedup:>9} "
                  f"{peak / 2**20:>9.2f} {memory:>10}")
    write("speed-up = baseline min / impl min, the baseline being nextrec's own model where the group has it "
          "(the installed nextrec), else the reference; peak MB = extra memory at the peak of one call "
          f"({rows[0].extra_info['memory_method']}); mem vs ref likewise")


# -- shared inputs: built once per size, reused by every implementation -------------------------

@functools.lru_cache(maxsize=1)
def _features_and_batch(size: Size, device: torch.device):
    dense, sparse, sequence = common.default_features(**common.CONFIGS[size.config])
    x, labels = common.make_batch(dense, sparse, sequence, batch=size.batch, device=device)
    return (dense, sparse, sequence), x, labels


@pytest.fixture
def features_and_batch(size, device):
    """``((dense, sparse, sequence), x, labels)`` of the size's config and batch."""
    return _features_and_batch(size, device)


@functools.lru_cache(maxsize=1)  # one pair at a time: a default-size pair holds ~1 GB of tables
def _model_pair(model: str, size: Size, device: torch.device):
    features, _, _ = _features_and_batch(size, device)
    return bench.build_models(model, device, features=features)


@pytest.fixture
def model_pair(size, device):
    """``model_pair(name) -> (reference_model, fast_model)`` with identical weights."""
    return lambda model: _model_pair(model, size, device)


@functools.lru_cache(maxsize=1)
def _nextrec_pair(model: str, size: Size, device: torch.device):
    import copy
    import nextrec_fast
    generation, _ = bench.installed_nextrec()
    features, _, _ = _features_and_batch(size, device)
    plain = bench.nextrec_model(model, features, bench.default_model_kwargs(model), seed=0, device=device)
    fast = nextrec_fast.accelerate(copy.deepcopy(plain))
    return plain, fast, lambda m: (lambda batch: generation.probabilities(m, batch))


@pytest.fixture
def nextrec_pair(size, device):
    """``nextrec_pair(name) -> (nextrec_model, accelerated_copy, forward_of)`` with the installed
    nextrec's own model (``forward_of(m)``: batch -> probabilities as nextrec scores them); skips
    where no nextrec is installed."""
    def get(model: str):
        if bench.installed_nextrec() is None:
            pytest.skip("no nextrec installed: the nextrec / accelerated rows need it (README command 2)")
        return _nextrec_pair(model, size, device)
    return get
