"""``nextrec-fast bench``: reference (nextrec's computation) vs fast models, side by side.

The default configuration is a realistic CTR setup: 26 sparse features (vocabularies log-spaced
from 1e3 to 1e6, dim 16), 3 sequence features (max_len 50, about half padding), 13 dense
features; MMOE 8 experts [256, 128] with [64] towers, PLE 2 levels of 2 shared + 2 specific
experts [256, 128], ESMM towers [256, 128, 64]. Timings are medians of repeats that alternate
reference and fast, so machine noise hits both alike; speed-ups are ratios within one run.
"""
from __future__ import annotations

import gc
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from nextrec_fast import reference
from nextrec_fast.bench.common import (CONFIGS, default_features, environment, machine_load, make_batch, reliability_warnings,
                                       spread, time_interleaved)

MODEL_NAMES = ("mmoe", "ple", "esmm")
MODES = ("forward_eval", "forward_backward", "train_step")
# `nextrec-fast bench --model` choices: the models, and "pooling" (the embedding pooling alone:
# nextrec-style vs the fused op vs F.embedding_bag per feature, see pooling.py).
BENCH_CHOICES = MODEL_NAMES + ("pooling",)


def default_model_kwargs(model: str) -> dict:
    towers = [{"dims": [64]}, {"dims": [64]}]
    common = dict(target=["click", "conversion"], task=["binary", "binary"])
    if model == "mmoe":
        return dict(expert_params={"dims": [256, 128]}, num_experts=8, tower_params_list=towers, **common)
    if model == "ple":
        return dict(shared_expert_params={"dims": [256, 128]}, specific_expert_params={"dims": [256, 128]},
                    num_shared_experts=2, num_specific_experts=2, num_levels=2, tower_params_list=towers, **common)
    if model == "esmm":
        return dict(ctr_params={"dims": [256, 128, 64]}, cvr_params={"dims": [256, 128, 64]},
                    target=["ctr", "ctcvr"])
    raise ValueError(f"unknown model {model!r}: expected one of {', '.join(MODEL_NAMES)}")


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    reference_ms: float
    fast_ms: float
    speedup: float
    reference_samples_ms: list = field(default_factory=list)
    fast_samples_ms: list = field(default_factory=list)


def _step_fn(model, mode, x, labels):
    if mode == "forward_eval":
        model.eval()

        def run():
            with torch.no_grad():
                model(x)
        return run
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if mode == "train_step" else None

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return run


def build_models(model: str, device, features=None, seed: int = 0, overrides: dict | None = None):
    from nextrec_fast.models import standalone
    dense, sparse, sequence = features or default_features()
    kwargs = {**default_model_kwargs(model), **(overrides or {})}
    fast_cls = {"mmoe": standalone.MMOE, "ple": standalone.PLE, "esmm": standalone.ESMM}[model]
    ref_cls = {"mmoe": reference.MMOE, "ple": reference.PLE, "esmm": reference.ESMM}[model]
    torch.manual_seed(seed)
    ref = ref_cls(dense_features=dense, sparse_features=sparse, sequence_features=sequence, device=str(device), **kwargs)
    fast = fast_cls(dense_features=dense, sparse_features=sparse, sequence_features=sequence, device=str(device), **kwargs)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def run(models=MODEL_NAMES, modes=MODES, batch: int = 2048, device: str | None = None, repeats: int = 5,
        warmup: int = 2, progress=True, config: str = "default", pooling_batches=None) -> dict:
    """Reference vs fast per model and mode; with "pooling" in ``models`` also the pooling
    benchmark (``result["pooling"]``) at ``pooling_batches`` (default: 2048 and 8192)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = {**environment(device), "config": config, "repeats": repeats}  # the load before the run
    model_names = [m for m in models if m != "pooling"]
    rows, total, done = [], len(model_names) * len(modes), 0
    for model in model_names:
        ref, fast = build_models(model, device, features=default_features(**CONFIGS[config]))
        features = (ref.dense_features, ref.sparse_features, ref.sequence_features)
        x, labels = make_batch(*features, batch=batch, device=device)
        for mode in modes:
            done += 1
            if progress:
                print(f"[{done}/{total}] {model} {mode} (batch {batch}) ...", file=sys.stderr, flush=True)
            # Fresh copies of the weights for training modes so both start from the same state.
            samples = time_interleaved({"reference": _step_fn(ref, mode, x, labels),
                                        "fast": _step_fn(fast, mode, x, labels)}, device, warmup, repeats)
            ref_ms, fast_ms = statistics.median(samples["reference"]), statistics.median(samples["fast"])
            rows.append(Row(model, mode, batch, ref_ms, fast_ms, ref_ms / fast_ms,
                            [round(s, 3) for s in samples["reference"]], [round(s, 3) for s in samples["fast"]]))
        del ref, fast, x, labels
        gc.collect()
    result = {"environment": env, "rows": [asdict(r) for r in rows]}
    if "pooling" in models:
        from nextrec_fast.bench import pooling
        result["pooling"] = pooling.run(
            batches=pooling_batches or pooling.DEFAULT_BATCHES, device=device, repeats=repeats,
            warmup=warmup, config=config,
            progress=(lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None)
    result["environment"]["load_at_end"] = round(machine_load()[0], 2)
    return result


def format_table(result: dict) -> str:
    """The result as the terminal shows it: a header, a legend saying what each column is compared
    with, per row the medians, their spread and the ratio, then any reliability warnings."""
    env = result["environment"]
    nextrec_fit = bool(result["rows"]) and all(r["mode"].startswith("nextrec_fit") for r in result["rows"])
    base, fast = ("plain nextrec", "accelerated") if nextrec_fit else ("reference", "fast")
    header = (f"nextrec-fast bench | device {env['device']} ({env['device_name']}) | torch {env['torch']} | "
              f"triton {env['triton']} | threads {env['threads']} of {env.get('cores', '?')} core(s) | "
              f"pooling: {env['pooling_op']} | config {env['config']}")
    if nextrec_fit:
        header += f" | nextrec {env.get('nextrec', '?')}, {env.get('steps_per_epoch', '?')} steps per epoch"
        legend = ("legend: nextrec's own fit on the installed nextrec, plain vs the same model after "
                  "nextrec_fast.accelerate, from the same weights and data, alternating; ms = median over the "
                  "epochs run (step: over every step), min-max beside it; speed-up = plain / accelerated median")
    else:
        legend = (f"legend: reference = nextrec's math re-implemented in plain PyTorch (nextrec_fast.reference, "
                  f"per-feature / per-expert loops), fast = the drop-in model, same weights; ms = median of "
                  f"{env.get('repeats', '?')} interleaved repeats, min-max beside it; speed-up = reference / fast "
                  f"median. Against nextrec itself: bench --nextrec")
        if env.get("config") == "small":
            legend += ("\nconfig small is a smoke test: its tables and batches are too small for the fast path to "
                       "pay off (speed-ups near or below 1x are expected); --config default measures")
    lines = [header, legend,
             f"{'model':<6} {'mode':<17} {'batch':>6} {base + ' ms':>16} {'min-max':>15} {fast + ' ms':>15} "
             f"{'min-max':>15} {'speed-up':>9}"]
    for r in result["rows"]:
        (b_lo, b_hi), (f_lo, f_hi) = spread(r["reference_samples_ms"]), spread(r["fast_samples_ms"])
        lines.append(f"{r['model']:<6} {r['mode']:<17} {r['batch']:>6} {r['reference_ms']:>16.1f} "
                     f"{f'{b_lo:.1f}-{b_hi:.1f}':>15} {r['fast_ms']:>15.1f} {f'{f_lo:.1f}-{f_hi:.1f}':>15} "
                     f"{r['speedup']:>8.2f}x")
    if not result["rows"]:
        lines = lines[:1]  # no model rows: no model header
    timed = [(f"{r['model']} {r['mode']} ({who})", r[key]) for r in result["rows"]
             for who, key in ((base, "reference_samples_ms"), (fast, "fast_samples_ms"))]
    if result.get("pooling"):
        from nextrec_fast.bench import pooling
        lines += ["", pooling.format_table(result["pooling"])]
        timed += [(f"pooling {r['mode']} {r['impl']} (batch {r['batch']})", r.get("samples_ms", []))
                  for r in result["pooling"]["rows"]]
    lines += reliability_warnings(env, timed)
    return "\n".join(lines)
