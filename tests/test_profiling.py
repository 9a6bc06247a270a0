"""Profiler ranges of the model stages, the reference's hook-added ranges, and `nextrec-fast profile`."""
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nextrec_fast import cli
from nextrec_fast.bench import common, profiling
from nextrec_fast.bench import models as benchmark
from nextrec_fast.ops import batch_norm_act, pooled_embedding

STAGE_NAMES = {f"nextrec_fast.{stage}" for stage in ("embedding", "experts", "gates", "towers")}


def small_models(model="mmoe"):
    return benchmark.build_models(model, "cpu", features=common.default_features(**common.CONFIGS["small"]))


def small_batch(net, batch=32):
    return common.make_batch(net.dense_features, net.sparse_features, net.sequence_features, batch=batch, device="cpu")


def traced_names(net, x, labels):
    step = profiling.training_step_fn(net.train(), x, labels, torch.optim.Adam(net.parameters()))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {event.name for event in prof.events()}


def test_fast_model_trace_has_stage_ranges():
    _, fast = small_models()
    names = traced_names(fast, *small_batch(fast))
    assert STAGE_NAMES <= names
    assert {"nextrec_fast.backward", "nextrec_fast.optimizer"} <= names


@pytest.mark.skipif(not pooled_embedding.is_available(),
                    reason=f"C++ pooling op not built: {pooled_embedding.unavailable_reason()}")
def test_fast_model_trace_has_pooled_embedding_op():
    _, fast = small_models()
    names = traced_names(fast, *small_batch(fast))
    assert any("pooled_embedding" in name for name in names)


@pytest.mark.skipif(not batch_norm_act.is_available(), reason="C++ extension not built")
def test_fast_model_trace_has_batch_norm_act_op():
    """On CPU the experts' BatchNorm + ReLU show up by name, forward and backward."""
    _, fast = small_models()
    names = traced_names(fast, *small_batch(fast))
    assert any("batch_norm_act_forward" in name for name in names)
    assert any("batch_norm_act_backward" in name for name in names)


@pytest.mark.parametrize("model", ["mmoe", "ple", "esmm"])
def test_reference_gets_stage_ranges_from_hooks(model):
    ref, _ = small_models(model)
    x, labels = small_batch(ref)
    expected = STAGE_NAMES - ({"nextrec_fast.experts", "nextrec_fast.gates"} if model == "esmm" else set())
    with profiling.reference_stage_ranges(ref):
        names = traced_names(ref, x, labels)
    assert expected <= names
    # The hooks are gone afterwards: the model is as it was.
    assert not (STAGE_NAMES & traced_names(ref, x, labels))


def test_measure_peak_memory_sees_a_temporary():
    size = 1 << 22  # 4 Mi floats = 16 MiB, freed before the call returns
    usage = profiling.measure_peak_memory(lambda: torch.ones(size).sum(), "cpu")
    assert usage.peak_bytes >= 4 * size and usage.allocated_bytes >= usage.peak_bytes


def test_profile_command_writes_both_traces(tmp_path, capsys):
    assert cli.main(["profile", "--model", "mmoe", "--config", "small", "--steps", "1", "--batch-size", "32",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for impl in ("reference", "fast"):
        trace = tmp_path / f"mmoe_{impl}_trace.json"
        assert trace.exists()
        assert any(e.get("name") == "nextrec_fast.experts" for e in json.loads(trace.read_text())["traceEvents"])
    assert "embedding" in out and "step total" in out and "speed-up" in out


def test_profile_warns_when_its_halves_ran_under_different_load():
    assert profiling.profile_load_warnings({"reference": (0.2, 2), "fast": (0.4, 2), "end": (0.3, 2)}) == []
    warning = profiling.profile_load_warnings({"reference": (0.2, 2), "fast": (1.9, 2), "end": (1.0, 2)})
    assert len(warning) == 1 and "different machine load" in warning[0] and "fast 1.9" in warning[0]
    assert profiling.profile_load_warnings({"reference": (3.0, 2), "fast": (3.1, 2)})  # busier than the cores


def test_profile_filters_the_cpu_only_profiler_noise(capfd):
    """torch's profiler prints a GPU probe ERROR on machines without a driver; we drop exactly those lines."""
    import os as _os
    with profiling._without_profiler_noise():
        _os.write(2, b"ERROR:x DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
        _os.write(2, b"USDT:x SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        _os.write(2, b"a real message\n")
    err = capfd.readouterr().err
    assert "a real message" in err and "gpuGetDeviceCount" not in err and "profiler_start" not in err
