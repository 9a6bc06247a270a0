"""What every benchmark here shares: the default configuration's features and batches, the
interleaved timer, the environment header, JSON output."""
from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time

import torch

from nextrec_fast.features import DenseFeature, SequenceFeature, SparseFeature

__all__ = ["CONFIGS", "default_features", "make_batch", "sync", "time_interleaved", "environment", "save_json",
           "machine_load", "default_threads", "spread", "reliability_warnings", "add_timing_arguments", "report"]


CONFIGS = {
    "default": {},
    # Same structure, small tables and sequences: a smoke test that runs in seconds.
    "small": dict(num_sparse=6, num_sequence=2, num_dense=3, max_vocab=1e4, seq_vocab=1000, max_len=10),
}


def default_features(num_sparse: int = 26, num_sequence: int = 3, num_dense: int = 13, dim: int = 16,
                     min_vocab: float = 1e3, max_vocab: float = 1e6, seq_vocab: int = 100_000, max_len: int = 50):
    sparse = []
    for i in range(num_sparse):
        frac = i / max(num_sparse - 1, 1)
        vocab = int(round(math.exp(math.log(min_vocab) + frac * (math.log(max_vocab) - math.log(min_vocab)))))
        sparse.append(SparseFeature(f"C{i + 1}", vocab_size=vocab, embedding_dim=dim))
    sequence = [SequenceFeature(f"hist{i + 1}", vocab_size=seq_vocab, max_len=max_len, embedding_dim=dim,
                                combiner="mean", padding_idx=0) for i in range(num_sequence)]
    dense = [DenseFeature(f"I{i + 1}") for i in range(num_dense)]
    return dense, sparse, sequence


def make_batch(dense, sparse, sequence, batch: int, device, seed: int = 0, padding_fraction: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    x = {}
    for f in sparse:
        x[f.name] = torch.randint(0, f.vocab_size, (batch,), generator=gen)
    for f in sequence:
        # Variable-length histories, left-aligned and padded with padding_idx: about half padding.
        lengths = torch.randint(0, int(2 * (1 - padding_fraction) * f.max_len) + 1, (batch, 1), generator=gen)
        ids = torch.randint(1, f.vocab_size, (batch, f.max_len), generator=gen)
        keep = torch.arange(f.max_len).unsqueeze(0) < lengths
        x[f.name] = torch.where(keep, ids, torch.full_like(ids, f.padding_idx or 0))
    for f in dense:
        x[f.name] = torch.randn(batch, generator=gen)
    labels = torch.randint(0, 2, (batch, 2), generator=gen).float()
    return {k: v.to(device) for k, v in x.items()}, labels.to(device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device, warmup: int, repeats: int, step=None, burst: int = 1,
                     settle_ms: float = 0.0, shuffle_seed: int | None = None) -> dict:
    """Milliseconds per call of each of ``fns`` (name -> callable), ``repeats`` samples each,
    after ``warmup`` rounds; each round calls them in turn, so machine noise hits all alike.
    ``step(fn)`` wraps each call (default: ``fn()``).

    ``burst`` > 1: a sample is untimed calls of the function (at least one, and for at least
    ``settle_ms``) followed by ``burst`` timed ones (their mean): each function's steady state
    when called repeatedly, without the after-effects of the function timed before it (its
    malloc churn and page faults, its cache footprint). On this 2-core VM memory-bound work runs
    slowly for a few ms after heavy compute: a 16 MB copy_ took 3.8x / 2.3x / 1.2x its usual
    time in the 1st / 2nd / 3rd call after a 2048x2048 matmul, and the pooling op 1.8x / 1.2x
    after nextrec's pooling.

    ``shuffle_seed``: draw the order of the functions afresh each round (seeded), so that none
    always follows the same one."""
    step = step or (lambda fn: fn())
    order_rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    for _ in range(warmup):
        for fn in fns.values():
            step(fn)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        names = list(fns)
        if order_rng is not None:
            order_rng.shuffle(names)
        for name in names:
            fn = fns[name]
            if burst > 1:
                settle_start = time.perf_counter()
                step(fn)
                while (time.perf_counter() - settle_start) * 1e3 < settle_ms:
                    step(fn)
            sync(device)
            start = time.perf_counter()
            for _ in range(burst):
                step(fn)
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / burst)
    return samples


# A timed sample of the model benchmarks lasts at least this long. At batch 64 a call takes 1-3
# ms, and a sample of one call measures the cache footprint of the variant timed before it as
# much as its own (0.3.1's MMOE eval at batch 64, 2 threads: 2.4 ms a call timed alone, 1.8 ms
# back to back; the fast model moved the other way as often). pytest-benchmark and timeit
# calibrate their rounds the same way.
MIN_SAMPLE_MS = 20.0


def calls_per_sample(fns: dict, device, min_sample_ms: float = MIN_SAMPLE_MS, cap: int = 64) -> int:
    """Back-to-back calls per timed sample (``time_interleaved``'s ``burst``, the same for all of
    ``fns``): enough for the fastest function's calls to last ``min_sample_ms``, at most ``cap``;
    1 where one call is already that long. Each function is called twice, the second timed."""
    fastest = float("inf")
    for fn in fns.values():
        fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        fastest = min(fastest, (time.perf_counter() - start) * 1e3)
    return max(1, min(cap, math.ceil(min_sample_ms / max(fastest, 1e-3))))


def machine_load() -> tuple[float, int]:
    """(1-minute load average, cores this process may run on); (0.0, cores) where unknown."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        return os.getloadavg()[0], cores
    except (AttributeError, OSError):
        return 0.0, cores


def default_threads() -> int:
    """The threads this machine can really give now: its cores less those other processes keep
    busy (load average), at least 1. With more OpenMP threads than free cores every timing gets
    10-100x slower and erratic."""
    load, cores = machine_load()
    return max(1, min(cores, int(round(cores - load))))


def spread(samples) -> tuple[float, float]:
    """(min, max) of a row's samples."""
    return (min(samples), max(samples)) if samples else (float("nan"), float("nan"))


# A row whose samples spread wider than this fraction of its median is flagged as unreliable.
WIDE_SPREAD = 0.5


def bf16_matmul_slowdown(size: int = 256, repeats: int = 5) -> float:
    """How many times slower a ``size`` x ``size`` bf16 matmul runs than a float32 one on this
    CPU (< 1: faster; AMX gave 0.14 here). Without AMX or AVX512-BF16, PyTorch emulates bf16
    matmuls and they run 10-100x slower, so autocast only slows training down there."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        times[dtype] = time.perf_counter() - start
    return times[torch.bfloat16] / times[torch.float32]


def reliability_warnings(env: dict, rows) -> list[str]:
    """Warnings that the ratios of a run cannot be trusted: a machine busier than the cores given
    (load average at the start or the end above the cores), rows whose samples spread widely.
    ``rows``: (label, samples) pairs."""
    warnings = []
    cores = env.get("cores")
    loads = [env[k] for k in ("load_at_start", "load_at_end") if env.get(k) is not None]
    if cores and loads and max(loads) > cores:
        warnings.append(f"WARNING: the machine was busy (load average {max(loads):.1f} on {cores} core(s)): other "
                        "processes took CPU time from these timings; the ratios are unreliable, rerun when it is idle")
    wide = [label for label, samples in rows
            if samples and (max(samples) - min(samples)) > WIDE_SPREAD * sorted(samples)[len(samples) // 2]]
    if wide:
        warnings.append(f"WARNING: samples spread over more than {WIDE_SPREAD:.0%} of the median in: "
                        f"{', '.join(wide)}; those ratios are unreliable (machine noise), rerun with more --repeats")
    slowdown = env.get("bf16_matmul_vs_fp32")
    if slowdown is not None and slowdown > 1:
        warnings.append(f"WARNING: a bfloat16 matmul ran {slowdown:.1f}x slower than a float32 one here: this CPU "
                        "emulates bfloat16 (no AMX or AVX512-BF16), so the bf16 rows show that, not the models")
    return warnings


def environment(device) -> dict:
    load, cores = machine_load()
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cores": cores,
        "load_at_start": round(load, 2),
    }
    try:
        from nextrec_fast.layers.embedding import _pooling_backend
        info["pooling_op"] = "C++/CUDA extension" if _pooling_backend() is not None else "torch embedding_bag"
    except Exception as exc:  # pragma: no cover - diagnostic only
        info["pooling_op"] = f"unavailable ({exc})"
    if torch.device(device).type == "cpu":
        try:
            from nextrec_fast.ops import dense_gemm
            info["cpu_vendor"] = dense_gemm.cpu_vendor() or None
            # Which library the fast path's float32 GEMMs use here (nextrec's always go to torch.mm).
            info["float32_gemm"] = dense_gemm.float32_library()
            if info["float32_gemm"] != "oneDNN":  # why not, where oneDNN cannot take them at all
                info["onednn_unavailable"] = dense_gemm.unavailable_reason()
        except Exception as exc:  # pragma: no cover - diagnostic only
            info["float32_gemm"] = f"unknown ({exc})"
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def save_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)


def add_timing_arguments(parser, repeats: int) -> None:
    """The options every ``python -m nextrec_fast.bench.<row>`` script shares: ``--batch-size``,
    ``--repeats``, ``--warmup``, ``--config``, ``--json``."""
    parser.add_argument("--batch-size", type=int, default=2048, help="rows per step")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved timed rounds (the medians' samples)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--config", default="default", choices=list(CONFIGS), help="feature set: default (the realistic 26 sparse + 3 sequence + 13 dense features) or small (a seconds-long smoke run)")
    parser.add_argument("--json", default=None, help="write the result here")


def report(table: str, result: dict, json_path: str | None) -> None:
    """Print a benchmark's table; write its result to ``json_path`` when given, and say so."""
    print(table)
    if json_path:
        save_json(result, json_path)
        print(f"wrote {json_path}", file=sys.stderr)


def table_optimizer_class(rule: str) -> type:
    """The optimiser class of an in-backward rule name ("sgd", "adagrad", "sparse_adam",
    "rowwise_adagrad": ``nextrec_fast.optim.SUPPORTED``'s values). Raises ``KeyError`` otherwise."""
    from nextrec_fast import optim
    return {name: cls for cls, name in optim.SUPPORTED.items()}[rule]
