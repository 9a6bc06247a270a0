"""Where the time goes: profiler traces of training steps, per-stage tables, peak memory.

``nextrec-fast profile`` (see ``cli.py``) profiles a few training steps of the reference model
(nextrec's computation) and of the fast model and prints, side by side, the time spent in each
stage. The fast models mark their stages with ``record_function("nextrec_fast.<stage>")``; the
reference model gets the same ranges from the outside, through forward hooks on its submodules
(:func:`reference_stage_ranges`), so both tables use the same names. The training loop adds
``nextrec_fast.loss`` / ``.backward`` / ``.optimizer`` around the rest of the step.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

STAGE_PREFIX = "nextrec_fast."
FORWARD_STAGES = ("embedding", "experts", "gates", "towers")
STEP_STAGES = ("loss", "backward", "optimizer")
STAGES = FORWARD_STAGES + STEP_STAGES


def stage_range(stage: str) -> str:
    return STAGE_PREFIX + stage


# -- peak memory of one call ------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryUsage:
    peak_bytes: int       # peak of (allocated - freed) during the call, above what was held before
    allocated_bytes: int  # sum of all allocation sizes during the call (CPU only; 0 on CUDA)
    method: str


def measure_peak_memory(fn, device) -> MemoryUsage:
    """Extra memory one call of ``fn`` needs at its peak.

    CUDA: ``torch.cuda.max_memory_allocated`` (peak stats reset first) minus the memory allocated
    before the call. CPU: PyTorch has no CPU peak counter, so the call runs under
    ``torch.profiler.profile(profile_memory=True)`` and the allocator's ``[memory]`` events
    (+bytes per allocation, -bytes per free) are summed in time order; the peak of that running
    total is the peak extra memory. Frees of tensors allocated before the call count negative,
    so the peak is never below zero but may be below the sum of allocations.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryUsage(torch.cuda.max_memory_allocated(device) - before, 0, "cuda.max_memory_allocated")
    # A garbage collection inside the call would free older tensors and hide part of the peak.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        if gc_was_enabled:
            gc.enable()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU]
    # Stable sort on time only: timestamps tie often, and sorting ties by size would put frees
    # before allocations and hide peaks; the events come in recording order.
    events.sort(key=lambda e: e.start_ns())
    running = peak = allocated = 0
    for nbytes in (e.nbytes() for e in events):
        running += nbytes
        peak = max(peak, running)
        allocated += max(nbytes, 0)
    return MemoryUsage(peak, allocated, "profiler memory events (CPU)")


# -- stage ranges on the reference model --------------------------------------------------------

def _stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(stage, module) for every submodule of a reference ESMM/MMOE/PLE that makes up a stage.

    ModuleLists are never called, so their elements get the hooks. What the models compute in
    ``forward`` itself (the reference's gate-weighted sums, stacking) is in no submodule and
    falls outside the stages: it shows up as the forward's remainder.
    """
    pairs = [("embedding", model.embedding)]
    if hasattr(model, "ctr_tower"):  # ESMM
        pairs += [("towers", model.ctr_tower), ("towers", model.cvr_tower)]
    if hasattr(model, "experts"):    # MMOE
        pairs += [("experts", m) for m in model.experts] + [("gates", m) for m in model.gates]
    if hasattr(model, "cgc_layers"):  # PLE
        for layer in model.cgc_layers:
            pairs += [("experts", m) for m in layer.shared_experts]
            pairs += [("experts", m) for task in layer.specific_experts for m in task]
            pairs += [("gates", m) for m in layer.task_gates] + [("gates", layer.shared_gate)]
    if hasattr(model, "towers"):
        pairs += [("towers", m) for m in model.towers]
    return pairs


@contextlib.contextmanager
def reference_stage_ranges(model: nn.Module):
    """Wrap the reference model's stage submodules in ``record_function("nextrec_fast.<stage>")``
    ranges (forward pre/post hooks), without touching its code. Removed on exit."""
    handles = []
    for stage, module in _stage_modules(model):
        open_ranges: list = []

        def enter(_module, _inputs, name=stage_range(stage), stack=open_ranges):
            ctx = record_function(name)
            ctx.__enter__()
            stack.append(ctx)

        def leave(_module, _inputs, _output, stack=open_ranges):
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


# -- profiling training steps -------------------------------------------------------------------

def training_step_fn(model: nn.Module, x: dict, labels: torch.Tensor, optimizer: torch.optim.Optimizer):
    """One Adam step on BCE, with the non-forward parts of the step in their own ranges."""
    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        with record_function(stage_range("loss")):
            loss = F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), labels)
        with record_function(stage_range("backward")):
            loss.backward()
        with record_function(stage_range("optimizer")):
            optimizer.step()
    return step


# What torch's profiler (kineto) prints on a machine without a GPU driver: its probe for GPUs
# ("gpuGetDeviceCount failed with code 35", as an ERROR) and its start/stop trace points. Neither
# is a failure of the profile; shown to a user they read as one.
_CPU_ONLY_PROFILER_NOISE = ("gpuGetDeviceCount failed", "SyncActivityProfilerHandler.cpp")


@contextlib.contextmanager
def _without_profiler_noise():
    """Capture file descriptor 2 (kineto writes from C++) and pass on every line but the noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(noise in line for noise in _CPU_ONLY_PROFILER_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def profile_steps(step, device, steps: int, trace_path: str | None = None, warmup: int = 1):
    """Profile ``steps`` calls of ``step`` after ``warmup`` profiled-but-discarded ones (so the
    profiler's own start-up cost and first-call allocations stay out); write a Chrome trace.
    Without CUDA, the profiler's own GPU probe messages are filtered out of stderr."""
    device = torch.device(device)
    quiet = _without_profiler_noise() if not torch.cuda.is_available() else contextlib.nullcontext()
    with quiet:
        return _profile_steps(step, device, steps, trace_path, warmup)


def _profile_steps(step, device, steps, trace_path, warmup):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)

    def on_ready(prof):
        if trace_path:
            os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
            prof.export_chrome_trace(trace_path)

    with profile(activities=activities, schedule=schedule, on_trace_ready=on_ready, record_shapes=False) as prof:
        for _ in range(warmup + steps):
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            prof.step()
    return prof


@dataclass
class StageTimes:
    """Milliseconds per step per stage (CPU wall time of the ranges; device time on CUDA)."""
    cpu_ms: dict
    device_ms: dict
    step_cpu_ms: float
    step_device_ms: float


def _device_time(event) -> float:
    return float(getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0) or 0.0)


def stage_times(prof, steps: int) -> StageTimes:
    cpu, dev, step_cpu, step_dev = {}, {}, 0.0, 0.0
    for avg in prof.key_averages():
        if avg.key.startswith(STAGE_PREFIX):
            stage = avg.key[len(STAGE_PREFIX):]
            cpu[stage] = cpu.get(stage, 0.0) + avg.cpu_time_total / 1e3 / steps
            dev[stage] = dev.get(stage, 0.0) + _device_time(avg) / 1e3 / steps
        elif avg.key.startswith("ProfilerStep"):  # "ProfilerStep*": all profiled steps
            step_cpu += avg.cpu_time_total / 1e3 / steps
            step_dev += _device_time(avg) / 1e3 / steps
    return StageTimes(cpu, dev, step_cpu, step_dev)


def ops_by_stage(prof, steps: int, top: int = 5) -> dict:
    """{stage: [(op name, self CPU ms per step), ...]}: each op attributed to its innermost
    enclosing stage range ("other" when none), heaviest first."""
    totals: dict = {}
    for event in prof.events():
        if event.name.startswith(STAGE_PREFIX) or event.name.startswith("ProfilerStep"):
            continue
        stage, parent = "other", event.cpu_parent
        while parent is not None:
            if parent.name.startswith(STAGE_PREFIX):
                stage = parent.name[len(STAGE_PREFIX):]
                break
            parent = parent.cpu_parent
        key = (stage, event.name)
        totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e3 / steps
    grouped: dict = {}
    for (stage, name), ms in totals.items():
        grouped.setdefault(stage, []).append((name, ms))
    return {stage: sorted(ops, key=lambda item: -item[1])[:top] for stage, ops in grouped.items()}


@dataclass
class ProfileResult:
    model: str
    device: str
    config: str
    batch: int
    steps: int
    times: dict        # {"reference": StageTimes, "fast": StageTimes}
    top_ops: dict      # {"reference": {stage: [...]}, "fast": {...}}
    traces: dict       # {"reference": path, "fast": path}
    loads: dict = field(default_factory=dict)  # {"reference" | "fast" | "end": (load average, cores)}


def profile_model(model: str = "mmoe", device: str | None = None, steps: int = 3, batch: int = 2048,
                  config: str = "default", out_dir: str = "nextrec_fast_profile", top: int = 5) -> ProfileResult:
    """Profile ``steps`` Adam training steps of the reference and the fast ``model``."""
    from nextrec_fast.bench import common
    from nextrec_fast.bench.models import build_models

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref, fast = build_models(model, device, features=common.default_features(**common.CONFIGS[config]))
    x, labels = common.make_batch(ref.dense_features, ref.sparse_features, ref.sequence_features,
                                     batch=batch, device=device)
    from nextrec_fast.bench.common import machine_load
    times, top_ops, traces, loads = {}, {}, {}, {}
    for impl, net in (("reference", ref), ("fast", fast)):
        loads[impl] = machine_load()
        net.train()
        step = training_step_fn(net, x, labels, torch.optim.Adam(net.parameters(), lr=1e-3))
        traces[impl] = os.path.join(out_dir, f"{model}_{impl}_trace.json")
        hooks = reference_stage_ranges(net) if impl == "reference" else contextlib.nullcontext()
        with hooks:
            prof = profile_steps(step, device, steps, traces[impl])
        times[impl] = stage_times(prof, steps)
        top_ops[impl] = ops_by_stage(prof, steps, top)
    loads["end"] = machine_load()
    return ProfileResult(model, str(device), config, batch, steps, times, top_ops, traces, loads)


def profile_load_warnings(loads: dict) -> list[str]:
    """A warning when the reference and the fast half were profiled under different machine load
    (load average differing by 0.5 or more between the starts of the halves and the end, or above
    the cores): their times are then not comparable."""
    if not loads:
        return []
    values = [load for load, _ in loads.values()]
    cores = max(c for _, c in loads.values())
    if max(values) - min(values) < 0.5 and max(values) <= cores:
        return []
    seen = ", ".join(f"{name} {load:.1f}" for name, (load, _) in loads.items())
    return [f"WARNING: the two halves ran under different machine load (load average at the start of each and at "
            f"the end: {seen}; {cores} core(s)): the reference / fast ratios are unreliable; rerun when the machine "
            "is idle"]


def format_profile(result: ProfileResult) -> str:
    ref, fast = result.times["reference"], result.times["fast"]
    on_cuda = result.device.startswith("cuda")
    lines = [f"nextrec-fast profile | {result.model} train step (Adam) | device {result.device} | "
             f"config {result.config} | batch {result.batch} | {result.steps} profiled steps | torch {torch.__version__}",
             "ms per step (CPU wall time of each stage's range" + ("; device time after /" if on_cuda else "") + ")",
             f"{'stage':<12} {'reference':>16} {'fast':>16} {'speed-up':>9}"]

    def cell(times: StageTimes, stage: str | None) -> tuple[str, float]:
        cpu = times.step_cpu_ms if stage is None else times.cpu_ms.get(stage, 0.0)
        dev = times.step_device_ms if stage is None else times.device_ms.get(stage, 0.0)
        text = f"{cpu:.2f}" + (f" / {dev:.2f}" if on_cuda else "")
        return text, (dev if on_cuda else cpu)

    forward_rest = {}
    for impl, times in (("reference", ref), ("fast", fast)):
        staged = sum(times.cpu_ms.get(s, 0.0) for s in STAGES)
        forward_rest[impl] = max(times.step_cpu_ms - staged, 0.0)
    for stage in STAGES + (None,):
        (ref_text, ref_ms), (fast_text, fast_ms) = cell(ref, stage), cell(fast, stage)
        speedup = f"{ref_ms / fast_ms:.2f}x" if fast_ms > 0 else "-"
        lines.append(f"{stage or 'step total':<12} {ref_text:>16} {fast_text:>16} {speedup:>9}")
        if stage == STAGES[-1]:
            rest_ref, rest_fast = forward_rest["reference"], forward_rest["fast"]
            lines.append(f"{'(rest)':<12} {rest_ref:>16.2f} {rest_fast:>16.2f} "
                         f"{(f'{rest_ref / rest_fast:.2f}x' if rest_fast > 0 else '-'):>9}")
    lines.append("(rest): step time outside the stage ranges, e.g. the reference's gate-weighted sums "
                 "computed in forward itself, zero_grad, Python overhead")
    for impl in ("reference", "fast"):
        lines.append(f"\nheaviest ops per stage, {impl} (self CPU ms per step):")
        for stage in STAGES + ("other",):
            ops = result.top_ops[impl].get(stage)
            if ops:
                lines.append(f"  {stage:<10} " + ", ".join(f"{name} {ms:.2f}" for name, ms in ops))
    lines.append("")
    lines += profile_load_warnings(result.loads)
    lines += [f"Chrome trace ({impl}): {path}  (open in chrome://tracing or https://ui.perfetto.dev)"
              for impl, path in result.traces.items()]
    return "\n".join(lines)
