"""``nextrec-fast bench``: reference (nextrec's computation) vs fast models, side by side.

The default configuration is a realistic CTR setup: 26 sparse features (vocabularies log-spaced
from 1e3 to 1e6, dim 16), 3 sequence features (max_len 50, about half padding), 13 dense
features; MMOE 8 experts [256, 128] with [64] towers, PLE 2 levels of 2 shared + 2 specific
experts [256, 128], ESMM towers [256, 128, 64]. Timings are medians of repeats that alternate
reference and fast, so machine noise hits both alike; speed-ups are ratios within one run.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from nextrec_fast import reference
from nextrec_fast.features import DenseFeature, SequenceFeature, SparseFeature

MODEL_NAMES = ("mmoe", "ple", "esmm")
MODES = ("forward_eval", "forward_backward", "train_step")
# `nextrec-fast bench --model` choices: the models, and "pooling" (the embedding pooling alone:
# nextrec-style vs the fused op vs F.embedding_bag per feature, see benchmark_pooling.py).
BENCH_CHOICES = MODEL_NAMES + ("pooling",)


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


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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
            _sync(device)
            start = time.perf_counter()
            for _ in range(burst):
                step(fn)
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / burst)
    return samples


CONFIGS = {
    "default": {},
    # Same structure, small tables and sequences: a smoke test that runs in seconds.
    "small": dict(num_sparse=6, num_sequence=2, num_dense=3, max_vocab=1e4, seq_vocab=1000, max_len=10),
}


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


def environment(device) -> dict:
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    try:
        from nextrec_fast.layers.embedding import _pooling_backend
        info["pooling_op"] = "C++/CUDA extension" if _pooling_backend() is not None else "torch embedding_bag"
    except Exception as exc:  # pragma: no cover - diagnostic only
        info["pooling_op"] = f"unavailable ({exc})"
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run(models=MODEL_NAMES, modes=MODES, batch: int = 2048, device: str | None = None, repeats: int = 5,
        warmup: int = 2, progress=True, config: str = "default", pooling_batches=None) -> dict:
    """Reference vs fast per model and mode; with "pooling" in ``models`` also the pooling
    benchmark (``result["pooling"]``) at ``pooling_batches`` (default: 2048 and 8192)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    result = {"environment": {**environment(device), "config": config}, "rows": [asdict(r) for r in rows]}
    if "pooling" in models:
        from nextrec_fast import benchmark_pooling
        result["pooling"] = benchmark_pooling.run(
            batches=pooling_batches or benchmark_pooling.DEFAULT_BATCHES, device=device, repeats=repeats,
            warmup=warmup, config=config,
            progress=(lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None)
    return result


def format_table(result: dict) -> str:
    env = result["environment"]
    nextrec_fit = bool(result["rows"]) and all(r["mode"].startswith("nextrec_fit") for r in result["rows"])
    # nextrec's own fit rows compare plain nextrec with the same model accelerated; the others our
    # reference (nextrec's math re-implemented) with the drop-in fast model.
    base, fast = ("plain nextrec ms", "accelerated ms") if nextrec_fit else ("reference ms", "fast ms")
    header = (f"nextrec-fast bench | device {env['device']} ({env['device_name']}) | torch {env['torch']} | "
              f"triton {env['triton']} | threads {env['threads']} | pooling: {env['pooling_op']} | config {env['config']}")
    if nextrec_fit:
        header += f" | nextrec {env.get('nextrec', '?')}, {env.get('steps_per_epoch', '?')} steps per epoch"
    lines = [header, f"{'model':<6} {'mode':<17} {'batch':>6} {base:>16} {fast:>15} {'speed-up':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<6} {r['mode']:<17} {r['batch']:>6} {r['reference_ms']:>16.1f} "
                     f"{r['fast_ms']:>15.1f} {r['speedup']:>8.2f}x")
    if not result["rows"]:
        lines.pop()  # no model rows: no model header
    if result.get("pooling"):
        from nextrec_fast import benchmark_pooling
        lines += ["", benchmark_pooling.format_table(result["pooling"])]
    return "\n".join(lines)


def save_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)


# -- nextrec's own training loop: plain vs accelerated ----------------------------------------
_V06_PARAMS = {"expert_params": "expert_mlp_params", "tower_params_list": "tower_mlp_params_list",
               "shared_expert_params": "shared_expert_mlp_params", "ctr_params": "ctr_mlp_params",
               "cvr_params": "cvr_mlp_params"}


def _v06_mlp(params):
    return [_v06_mlp(p) for p in params] if isinstance(params, list) else \
        {("hidden_dims" if k == "dims" else k): v for k, v in params.items()}


def _nextrec_model(model: str, features, kwargs: dict, seed: int):
    """nextrec's own model (whichever generation is installed) for the benchmark's configuration:
    0.3's arguments, or the same structure in 0.6's (``hidden_dims``, ``*_mlp_params``, 0.6's
    other defaults such as ``norm_type="none"``)."""
    from importlib import import_module
    from nextrec.basic import features as nf
    dense, sparse, sequence = features
    try:
        cls = getattr(import_module(f"nextrec.models.multitask.{model}"), model.upper())
    except ImportError:
        cls = getattr(import_module(f"nextrec.models.multi_task.{model}"), model.upper())
        nr_features = (
            [nf.DenseFeature(f.name, embedding_dim=f.embedding_dim, input_dim=f.input_dim, use_embedding=f.use_embedding)
             for f in dense],
            [nf.SparseFeature(f.name, f.vocab_size, embedding_dim=f.embedding_dim, padding_idx=f.padding_idx)
             for f in sparse],
            [nf.SequenceFeature(f.name, f.vocab_size, max_len=f.max_len, embedding_dim=f.embedding_dim,
                                combiner=f.combiner, padding_idx=f.padding_idx) for f in sequence])
    else:
        nr_features = (
            [nf.DenseFeature(f.name, input_dim=f.input_dim) for f in dense],
            [nf.SparseFeature(f.name, f.vocab_size, embedding_dim=f.embedding_dim, padding_idx=f.padding_idx)
             for f in sparse],
            [nf.SequenceFeature(f.name, f.vocab_size, max_len=f.max_len, embedding_dim=f.embedding_dim,
                                combiner=f.combiner, padding_idx=f.padding_idx) for f in sequence])
        kwargs = {_V06_PARAMS.get(k, k): _v06_mlp(v) if k in _V06_PARAMS else v for k, v in kwargs.items()}
        if "specific_expert_params" in kwargs:
            tasks = len(kwargs["target"])
            kwargs["specific_expert_mlp_params"] = [_v06_mlp(kwargs.pop("specific_expert_params"))] * tasks
        kwargs.pop("task", None)
    torch.manual_seed(seed)
    return cls(*nr_features, **kwargs)


def _user_data(x: dict, labels, sequence_names, targets) -> dict:
    """The batch as a user's in-memory data holds it: columns of numbers, and each row's id history
    as a list of its ids (the padding left for nextrec's data path to add)."""
    data = {}
    for name, value in x.items():
        if name in sequence_names:
            ids = value.numpy()
            data[name] = [row[row != 0].tolist() for row in ids]
        else:
            data[name] = value.numpy()
    for i, name in enumerate(targets):
        data[name] = labels[:, i % labels.shape[1]].numpy()
    return data


class _StepTimer:
    """Times nextrec's fit loop per training step: the interval between optimiser steps (data
    loading, forward, loss, regularisation, backward, clipping and the step itself)."""

    def __init__(self, optimizer):
        self.samples, self._last = [], None
        self._step = optimizer.step

        def timed_step(*args, **kwargs):
            out = self._step(*args, **kwargs)
            now = time.perf_counter()
            if self._last is not None:
                self.samples.append((now - self._last) * 1e3)
            self._last = now
            return out
        optimizer.step = timed_step

    def new_run(self):
        self._last = None  # the first interval of a fit call includes its set-up: not a step


def run_nextrec(models=("mmoe", "ple"), batch: int = 2048, steps: int = 8, rounds: int = 2,
                progress=True, config: str = "default") -> dict:
    """nextrec's own ``fit`` (one epoch of ``steps`` batches), plain vs ``nextrec_fast.accelerate``-ed,
    from the same weights and data, alternating: per model one row with the median training step,
    one with the epoch's wall time as the user sees it (data preparation from per-row id lists,
    the steps, nextrec's end-of-epoch checkpoint and logging)."""
    import logging
    import tempfile
    import nextrec_fast
    logging.getLogger().setLevel(logging.WARNING)
    features = default_features(**CONFIGS[config])
    rows = []
    for model in models:
        kwargs = default_model_kwargs(model)
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # nextrec writes logs and checkpoints under the working directory
            try:
                plain = _nextrec_model(model, features, kwargs, seed=0)
                fast = _nextrec_model(model, features, kwargs, seed=0)
                fast.load_state_dict(plain.state_dict())
                targets = list(getattr(plain, "target_columns", None) or plain.target)
                for m in (plain, fast):
                    m.compile(optimizer="adam", optimizer_params={"lr": 1e-3}, loss="bce")
                nextrec_fast.accelerate(fast)
                x, labels = make_batch(*features, batch=batch * steps, device="cpu", seed=1)
                data = _user_data(x, labels, {f.name for f in features[2]}, targets)
                del x
                timers = {"plain": _StepTimer(plain.optimizer_fn), "accelerated": _StepTimer(fast.optimizer_fn)}
                epochs = {"plain": [], "accelerated": []}
                for r in range(rounds):
                    for name, m in (("plain", plain), ("accelerated", fast)):
                        if progress:
                            print(f"[{model} batch {batch}] round {r + 1}/{rounds}: {name} fit ...", file=sys.stderr,
                                  flush=True)
                        timers[name].new_run()
                        start = time.perf_counter()
                        m.fit(data, epochs=1, batch_size=batch, shuffle=False, metrics=["auc", "logloss"])
                        epochs[name].append((time.perf_counter() - start) * 1e3)
            finally:
                os.chdir(cwd)
        for mode, plain_samples, fast_samples in (
                ("nextrec_fit_step", timers["plain"].samples, timers["accelerated"].samples),
                ("nextrec_fit_epoch", epochs["plain"], epochs["accelerated"])):
            plain_ms, fast_ms = statistics.median(plain_samples), statistics.median(fast_samples)
            rows.append(Row(model, mode, batch, plain_ms, fast_ms, plain_ms / fast_ms,
                            [round(v, 1) for v in plain_samples], [round(v, 1) for v in fast_samples]))
        del plain, fast, data
        gc.collect()
    env = {**environment(torch.device("cpu")), "config": config, "steps_per_epoch": steps}
    try:
        import nextrec
        env["nextrec"] = getattr(nextrec, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    return {"environment": env, "rows": [asdict(r) for r in rows]}
