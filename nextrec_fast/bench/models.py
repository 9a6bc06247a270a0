"""``nextrec-fast bench``: nextrec itself, the reference and the fast models side by side, with
each step's GEMM floor.

The default configuration is a realistic CTR setup: 26 sparse features (vocabularies log-spaced
from 1e3 to 1e6, dim 16), 3 sequence features (max_len 50, about half padding), 13 dense
features; MMOE 8 experts [256, 128] with [64] towers, PLE 2 levels of 2 shared + 2 specific
experts [256, 128], ESMM towers [256, 128, 64].

Per model and mode, in one interleaved loop (each round calls every variant once, so machine
noise hits all alike; the numbers are medians of the rounds):
- ``nextrec``: the installed nextrec's own model (either generation), when nextrec is installed;
- ``reference``: nextrec 0.3.1's math re-implemented in plain PyTorch (``nextrec_fast.reference``);
- ``fast``: with nextrec installed, the nextrec model after ``nextrec_fast.accelerate`` (same
  weights, what a user gets); without it, the drop-in ``nextrec_fast.models.standalone`` model
  with the reference's weights;
- ``gemm_floor``: the fast step's own GEMMs alone (``nextrec_fast.bench.gemm_floor``).
Speed-ups are over nextrec when it is installed, else over the reference; the table says which.

With ``autocast="bf16"`` every variant runs under ``torch.autocast(device, torch.bfloat16)``
(float32 weights, bfloat16 GEMMs: AMX on CPUs that have it), the GEMM floor is the bfloat16 GEMMs,
and the baseline also runs without autocast in the same loop (``<baseline>_fp32``), so each row
gives the speed-up over the baseline both under the same autocast and in float32.
"""
from __future__ import annotations

import copy
import gc
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from nextrec_fast import reference
from nextrec_fast.bench import gemm_floor
from nextrec_fast.bench.common import (CONFIGS, MIN_SAMPLE_MS, bf16_matmul_slowdown, calls_per_sample, default_features, environment, machine_load, make_batch, reliability_warnings,
                                       spread, table_optimizer_class, time_interleaved)

MODEL_NAMES = ("mmoe", "ple", "esmm")
MODES = ("forward_eval", "forward_backward", "train_step", "train_step_fused_tables", "train_step_lazy_adam")
# Training modes where the fast model's tables are updated in the pooling backward
# (nextrec_fast.optim) and everything else, nextrec's whole model included, by Adam(fused=True):
# mode -> (the tables' rule name in nextrec_fast.optim.SUPPORTED, its kwargs).
TABLES_IN_BACKWARD = {"train_step_fused_tables": ("rowwise_adagrad", {"lr": 0.01}),
                      "train_step_lazy_adam": ("sparse_adam", {"lr": 1e-3})}


def table_optimizer(mode: str):
    """``(class, kwargs)`` of the tables' in-backward optimiser in ``mode`` (``TABLES_IN_BACKWARD``):
    row-wise Adagrad, FBGEMM's rule (issue #16's speed row), or lazy Adam, torch.optim.SparseAdam's
    rule at the dense Adam's lr (the one that kept MovieLens test AUC, docs/benchmarks.md)."""
    rule, kwargs = TABLES_IN_BACKWARD[mode]
    return table_optimizer_class(rule), dict(kwargs)


# `nextrec-fast bench --autocast` choices: name -> autocast dtype (None: float32 throughout).
AUTOCAST = {"none": None, "bf16": torch.bfloat16}


def autocast_step(step, device, dtype):
    """``step`` run under ``torch.autocast(device.type, dtype)`` (``dtype`` None: ``step`` itself)."""
    if dtype is None:
        return step

    def run():
        with torch.autocast(device.type, dtype=dtype):
            step()
    return run


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
    """One model and mode: ``baseline`` (what the speed-up is over: "nextrec 0.3.1", "reference",
    "plain nextrec") against ``fast``, medians and every sample in ms; ``others``: further variants
    timed in the same loop ("reference" where the baseline is nextrec, "gemm_floor"), each
    ``{"ms": median, "samples_ms": [...]}``; ``gemm_gflop``: GFLOP of the GEMMs one step runs, per
    variant recorded; ``calls``: back-to-back calls per sample (each sample is their mean)."""
    model: str
    mode: str
    batch: int
    baseline: str
    baseline_ms: float
    fast_ms: float
    speedup: float
    baseline_samples_ms: list = field(default_factory=list)
    fast_samples_ms: list = field(default_factory=list)
    others: dict = field(default_factory=dict)
    gemm_gflop: dict = field(default_factory=dict)
    calls: int = 1


def make_row(model: str, mode: str, batch: int, baseline: str, samples: dict, baseline_key: str,
             gemm_gflop: dict | None = None, digits: int = 3, calls: int = 1) -> Row:
    """A Row from ``samples`` (variant -> ms samples, with ``baseline_key`` and "fast")."""
    base, fast = statistics.median(samples[baseline_key]), statistics.median(samples["fast"])
    others = {name: {"ms": statistics.median(values), "samples_ms": [round(v, digits) for v in values]}
              for name, values in samples.items() if name not in (baseline_key, "fast")}
    return Row(model, mode, batch, baseline, base, fast, base / fast,
               [round(v, digits) for v in samples[baseline_key]], [round(v, digits) for v in samples["fast"]],
               others, dict(gemm_gflop or {}), calls)


def _step_fn(model, mode, x, labels, forward=None, tables_in_backward: bool = False):
    """One call of ``mode`` on ``model``: ``forward(x)`` gives ``[B, T]`` probabilities (default:
    ``model(x)``); training modes take BCE on them, ``zero_grad(set_to_none=True)`` first.
    "train_step": then torch's default Adam over every parameter; "train_step_fused_tables" and
    "train_step_lazy_adam": ``Adam(fused=True)``, and with ``tables_in_backward`` (the fast variant)
    the embedding tables under ``table_optimizer(mode)`` applied in the pooling backward instead
    (``nextrec_fast.optim``; undo with ``optim.remove_optimizer_in_backward(model.embedding.tables())``)."""
    forward = forward or model
    if mode == "forward_eval":
        model.eval()

        def run():
            with torch.no_grad():
                forward(x)
        return run
    model.train()
    optimizer = None
    if mode == "train_step":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif mode in TABLES_IN_BACKWARD:
        params = list(model.parameters())
        if tables_in_backward:
            from nextrec_fast import optim
            tables = model.embedding.tables()
            cls, kwargs = table_optimizer(mode)
            optim.apply_optimizer_in_backward(cls, tables, kwargs)
            params = [p for p in params if all(p is not t for t in tables)]
        optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)

    def run():
        model.zero_grad(set_to_none=True)
        out = forward(x)
        loss = F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return run


def build_models(model: str, device, features=None, seed: int = 0, overrides: dict | None = None):
    """(reference, drop-in) models of the benchmark's configuration, with the same weights."""
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


def installed_nextrec():
    """(the installed nextrec's compat adapter, its version) or None where no nextrec is installed."""
    from nextrec_fast.compat import installed_generation
    try:
        generation = installed_generation()
        import nextrec
    except ImportError:
        return None
    return generation, getattr(nextrec, "__version__", generation.name)


def nextrec_model(model: str, features, kwargs: dict, seed: int, device="cpu"):
    """nextrec's own model (whichever generation is installed) for the benchmark's configuration,
    in that generation's arguments (0.6: ``hidden_dims``, ``*_mlp_params``, its other defaults
    such as ``norm_type="none"``)."""
    from nextrec_fast.compat import installed_generation
    generation = installed_generation()
    dense, sparse, sequence = features
    dense_args = [{"name": f.name, "input_dim": f.input_dim} for f in dense]
    if generation.name == "0.3":
        dense_args = [{**a, "embedding_dim": f.embedding_dim, "use_embedding": f.use_embedding}
                      for a, f in zip(dense_args, dense)]
    nr_features = generation.features(
        dense_args,
        [{"name": f.name, "vocab_size": f.vocab_size, "embedding_dim": f.embedding_dim, "padding_idx": f.padding_idx}
         for f in sparse],
        [{"name": f.name, "vocab_size": f.vocab_size, "max_len": f.max_len, "embedding_dim": f.embedding_dim,
          "combiner": f.combiner, "padding_idx": f.padding_idx} for f in sequence])
    torch.manual_seed(seed)
    arguments = generation.model_arguments(model, kwargs)
    if generation.name == "0.3":
        arguments["device"] = str(device)
    return generation.model_class(model)(*nr_features, **arguments).to(device)


def build_variants(model: str, device, features, found=None, seed: int = 0) -> tuple[dict, str]:
    """The variants one bench row times, ``name -> (module, forward)`` (forward: batch dict ->
    ``[B, T]`` probabilities), and the name of the baseline ("nextrec" or "reference").
    ``found``: ``installed_nextrec()``, or None to time against the reference."""
    import nextrec_fast
    ref, standalone = build_models(model, device, features=features, seed=seed)
    variants = {"reference": (ref, ref)}
    if found is None:
        variants["fast"] = (standalone, standalone)
        return variants, "reference"
    del standalone
    generation, _ = found
    plain = nextrec_model(model, features, default_model_kwargs(model), seed=seed, device=device)
    fast = nextrec_fast.accelerate(copy.deepcopy(plain))
    variants["nextrec"] = (plain, lambda batch, m=plain: generation.probabilities(m, batch))
    variants["fast"] = (fast, lambda batch, m=fast: generation.probabilities(m, batch))
    return variants, "nextrec"


def run(models=MODEL_NAMES, modes=MODES, batch: int | list[int] = 2048, device: str | None = None, repeats: int = 5,
        warmup: int = 2, progress=True, config: str = "default", pooling_batches=None,
        against_nextrec: bool = True, autocast: str = "none") -> dict:
    """Per model, batch (one or a list) and mode, the variants of the module docstring timed
    interleaved; with "pooling" in ``models`` also the pooling benchmark (``result["pooling"]``) at ``pooling_batches``
    (default: 2048 and 8192). ``against_nextrec=False``: the reference is the baseline even where
    nextrec is installed. ``autocast``: a key of ``AUTOCAST`` ("bf16": the module docstring)."""
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST)}, got {autocast!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = {**environment(device), "config": config, "repeats": repeats,
           "autocast": autocast}  # the load before the run
    dtype = AUTOCAST[autocast]
    if dtype is torch.bfloat16 and device.type == "cpu":
        env["bf16_matmul_vs_fp32"] = round(bf16_matmul_slowdown(), 3)  # > 1: emulated, warned about
    found = installed_nextrec() if against_nextrec else None
    env["nextrec"] = found[1] if found else None
    model_names = [m for m in models if m != "pooling"]
    batches = [batch] if isinstance(batch, int) else list(batch)
    rows, total, done = [], len(model_names) * len(modes) * len(batches), 0
    features = default_features(**CONFIGS[config])
    for model in model_names:
        variants, baseline_key = build_variants(model, device, features, found)
        for batch, mode in ((b, m) for b in batches for m in sorted(modes, key=MODES.index)):
            x, labels = make_batch(*features, batch=batch, device=device)
            done += 1
            if progress:
                print(f"[{done}/{total}] {model} {mode} (batch {batch}) ...", file=sys.stderr, flush=True)
            steps = {name: autocast_step(_step_fn(module, mode, x, labels, forward, tables_in_backward=name == "fast"),
                                         device, dtype)
                     for name, (module, forward) in variants.items()}
            if dtype is not None:  # the baseline in float32 too, in the same loop
                module, forward = variants[baseline_key]
                steps[f"{baseline_key}_fp32"] = _step_fn(module, mode, x, labels, forward)
            # Warm the fast step before recording its GEMMs (plans and caches are built on first use).
            steps["fast"]()
            fast_gemms = gemm_floor.record_gemms(steps["fast"])
            gflop = {"fast": gemm_floor.gemm_gflop(fast_gemms),
                     baseline_key: gemm_floor.gemm_gflop(gemm_floor.record_gemms(steps[baseline_key]))}
            if gflop["fast"] < 0.9 * gflop[baseline_key]:
                # GEMMs hidden inside fused kernels (Triton on CUDA): the baseline's GEMMs stand in.
                fast_gemms = gemm_floor.record_gemms(steps[baseline_key])
                gflop["floor_from"] = baseline_key
            steps["gemm_floor"] = gemm_floor.replay(fast_gemms)
            calls = calls_per_sample(steps, device)  # 1 at large batches, more where a call is short
            samples = time_interleaved(steps, device, warmup, repeats, burst=calls)
            rows.append(make_row(model, mode, batch, _baseline_label(baseline_key, env), samples, baseline_key,
                                 {k: round(v, 4) if isinstance(v, float) else v for k, v in gflop.items()}, calls=calls))
            del steps, x, labels
            if mode in TABLES_IN_BACKWARD:
                from nextrec_fast import optim
                optim.remove_optimizer_in_backward(variants["fast"][0].embedding.tables())
        del variants
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


def _baseline_label(key: str, env: dict) -> str:
    return f"nextrec {env['nextrec']}" if key == "nextrec" else "reference"


def _cell(median: float | None, samples) -> str:
    if median is None:
        return "-"
    lo, hi = spread(samples)
    return f"{median:.1f} [{lo:.1f}-{hi:.1f}]"


def format_table(result: dict) -> str:
    """The result as the terminal shows it: a header, a legend saying what each column is compared
    with, per row the medians with their spread and the ratios, then any reliability warnings."""
    env = result["environment"]
    rows = result["rows"]
    nextrec_fit = bool(rows) and all(r["mode"].startswith("nextrec_fit") for r in rows)
    header = (f"nextrec-fast bench | device {env['device']} ({env['device_name']}) | torch {env['torch']} | "
              f"triton {env['triton']} | threads {env['threads']} of {env.get('cores', '?')} core(s) | "
              f"pooling: {env['pooling_op']} | config {env['config']}"
              + (f" | {env['cpu_vendor'] + ', ' if env.get('cpu_vendor') else ''}fast float32 GEMMs: {env['float32_gemm']}"
                 + (f" (oneDNN: {env['onednn_unavailable']})" if env.get("onednn_unavailable") else "")
                 if env.get("float32_gemm") else "")
              + (f" | autocast {env['autocast']}" if env.get("autocast", "none") != "none" else ""))
    if nextrec_fit:
        header += f" | nextrec {env.get('nextrec', '?')}, {env.get('steps_per_epoch', '?')} steps per epoch"
        legend = ("legend: nextrec's own fit on the installed nextrec, plain vs the same model after "
                  "nextrec_fast.accelerate, from the same weights and data, alternating; ms = median over the "
                  "epochs run (step: over every step), [min-max] beside it; speed-up = plain / accelerated median")
        lines = [header, legend, f"{'model':<6} {'mode':<17} {'batch':>6} {'plain nextrec ms':>22} "
                                 f"{'accelerated ms':>22} {'speed-up':>9}"]
        for r in rows:
            lines.append(f"{r['model']:<6} {r['mode']:<17} {r['batch']:>6} "
                         f"{_cell(r['baseline_ms'], r['baseline_samples_ms']):>22} "
                         f"{_cell(r['fast_ms'], r['fast_samples_ms']):>22} {r['speedup']:>8.2f}x")
        timed = [(f"{r['model']} {r['mode']} ({who})", r[key]) for r in rows
                 for who, key in (("plain", "baseline_samples_ms"), ("accelerated", "fast_samples_ms"))]
    else:
        against = f"nextrec {env['nextrec']} (installed)" if env.get("nextrec") else "the reference (no nextrec installed)"
        legend = (f"legend: nextrec = the installed nextrec's own model ('-': none installed); reference = nextrec 0.3.1's math "
                  f"re-implemented in plain PyTorch (nextrec_fast.reference, per-feature / per-expert loops); fast = "
                  f"{'the nextrec model after nextrec_fast.accelerate' if env.get('nextrec') else 'the drop-in model'}"
                  f", same weights; GEMM floor = the fast step's own GEMMs alone (same shapes, threads); "
                  f"ms = median of {env.get('repeats', '?')} interleaved repeats, [min-max] beside it (a repeat: one "
                  f"call, or where calls are short the mean of enough back-to-back calls to last "
                  f"{MIN_SAMPLE_MS:.0f} ms, the same count for every variant); speed-up "
                  f"= baseline median / fast median, the baseline being {against}; vs ref = reference / fast "
                  f"(the reference always models nextrec 0.3.1: BatchNorm MLPs, whichever nextrec is installed); fast/floor = "
                  f"fast / GEMM floor (1.0: nothing but GEMMs left, lower is better); train_step: torch's Adam on "
                  f"every parameter; train_step_fused_tables / train_step_lazy_adam: Adam(fused=True), and for fast "
                  f"the tables under row-wise Adagrad / lazy Adam (SparseAdam's rule) in the pooling backward (a "
                  f"different table optimiser: nextrec_fast.optim)")
        if env.get("config") == "small":
            legend += ("\nconfig small is a smoke test: its tables and batches are too small for the fast path to "
                       "pay off (speed-ups near or below 1x are expected); --config default measures")
        autocast = env.get("autocast", "none") != "none"
        speedup_head, fp32_head = "speed-up", ""
        if autocast:
            base_name = "nextrec" if env.get("nextrec") else "reference"
            legend += (f"\nautocast {env['autocast']}: every column runs under torch.autocast(..., bfloat16) (float32 "
                       f"weights, bfloat16 GEMMs; the GEMM floor is those bf16 GEMMs) except '{base_name} fp32 ms', "
                       f"the same {base_name} model without autocast in the same loop. vs {base_name} bf16 = the "
                       f"speed-up over {base_name} under the same autocast; vs {base_name} fp32 = {base_name}'s "
                       f"float32 median / the fast bf16 median")
            speedup_head = f"vs {base_name} bf16"
            fp32_head = f" {base_name + ' fp32 ms':>20} {'vs ' + base_name + ' fp32':>17}"
        width = max(9, len(speedup_head))
        legend = legend.replace("; ", ";\n  ")  # a clause a line: one 900-character line went unread
        lines = [header, legend,
                 f"{'model':<6} {'mode':<23} {'batch':>6} {'nextrec ms':>20} {'reference ms':>20} {'fast ms':>20} "
                 f"{'GEMM floor ms':>20} {speedup_head:>{width}} {'vs ref':>7} {'fast/floor':>10}{fp32_head}"]
        timed = []
        for r in rows:
            others = r.get("others", {})
            ref = (r["baseline_ms"], r["baseline_samples_ms"]) if r["baseline"] == "reference" else \
                (others.get("reference", {}).get("ms"), others.get("reference", {}).get("samples_ms", []))
            nxt = (r["baseline_ms"], r["baseline_samples_ms"]) if r["baseline"] != "reference" else (None, [])
            floor = others.get("gemm_floor", {})
            vs_ref = f"{ref[0] / r['fast_ms']:.2f}x" if ref[0] else "-"
            over_floor = f"{r['fast_ms'] / floor['ms']:.2f}x" if floor.get("ms") else "-"
            fp32_cells = ""
            if autocast:
                fp32 = next((v for k, v in others.items() if k.endswith("_fp32")), {})
                vs_fp32 = f"{fp32['ms'] / r['fast_ms']:.2f}x" if fp32.get("ms") else "-"
                fp32_cells = f" {_cell(fp32.get('ms'), fp32.get('samples_ms', [])):>20} {vs_fp32:>17}"
            lines.append(f"{r['model']:<6} {r['mode']:<23} {r['batch']:>6} {_cell(*nxt):>20} {_cell(*ref):>20} "
                         f"{_cell(r['fast_ms'], r['fast_samples_ms']):>20} "
                         f"{_cell(floor.get('ms'), floor.get('samples_ms', [])):>20} {r['speedup']:>{width - 1}.2f}x "
                         f"{vs_ref:>7} {over_floor:>10}{fp32_cells}")
            timed += [(f"{r['model']} {r['mode']} ({who})", samples) for who, samples in
                      ((r["baseline"], r["baseline_samples_ms"]), ("fast", r["fast_samples_ms"]))]
        per_model = {}
        for r in rows:
            g = r.get("gemm_gflop") or {}
            if "fast" in g:
                base = g.get("nextrec", g.get("reference", 0.0))
                per_model.setdefault(f"{r['model']} @{r['batch']}", []).append(f"{r['mode']} {g['fast']:.2f}/{base:.2f}")
        if per_model:
            lines.append("GEMM GFLOP per step, fast/baseline (nextrec, or the reference without it): "
                         + "; ".join(f"{m}: {', '.join(v)}" for m, v in per_model.items()))
        if any(r.get("gemm_gflop", {}).get("floor_from") for r in rows):
            lines.append("GEMM floor from the baseline's GEMMs where the fast path runs its GEMMs inside fused kernels")
    if not rows:
        lines = lines[:1]  # no model rows: no model header
    if result.get("pooling"):
        from nextrec_fast.bench import pooling
        lines += ["", pooling.format_table(result["pooling"])]
        timed += [(f"pooling {r['mode']} {r['impl']} (batch {r['batch']})", r.get("samples_ms", []))
                  for r in result["pooling"]["rows"]]
    lines += reliability_warnings(env, timed)
    return "\n".join(lines)
