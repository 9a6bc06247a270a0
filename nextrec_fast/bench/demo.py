"""``nextrec-fast demo``: multi-task training on MovieLens-100K, plain nextrec vs nextrec_fast.

Per model, from the same initial weights and the same batch order, one after the other:
  - ``nextrec``: plain nextrec, its own ``fit``;
  - ``accelerated``: ``nextrec_fast.accelerate(model)``, nextrec's own ``fit``;
  - ``accelerated_bf16``: the same ``fit`` called inside ``torch.autocast("cpu", torch.bfloat16)``
    (float32 weights, bf16 GEMMs: what a user gets by wrapping their ``fit``; where bf16 runs);
  - ``drop_in``: nextrec_fast's drop-in class in a plain PyTorch loop (Adam, BCE per task);
  - ``drop_in_bf16``: that loop under ``torch.autocast("cpu", torch.bfloat16)`` (where bf16 runs);
  - opt-in (``variants=``): ``accelerated_tables`` (a table optimiser in the pooling backward) and
    ``accelerated_bf16_tables`` (tables stored in bf16, ``embedding.cast_tables``; nextrec's Adam
    then keeps their state in bf16 too).
Each epoch is one ``fit(epochs=1)`` call (nextrec prepares its data in each call, as a user who
evaluates every epoch sees it); the test set is scored after each epoch, outside the timed part.

The quality yardstick: ``rounding_runs`` more runs of ``nextrec`` and of ``accelerated``, each
from the initial weights moved one ulp per element in a seeded random direction. How far those
move plain nextrec's test AUC is what float32 rounding alone does (``parity``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

__all__ = ["VARIANTS", "TABLE_OPTIMIZERS", "default_table_lr", "run_demo", "format_demo", "demo_model_kwargs", "parity"]

VARIANTS = {
    "nextrec": "plain nextrec, its fit",
    "accelerated": "nextrec_fast.accelerate, nextrec's fit",
    "accelerated_bf16": "accelerated, nextrec's fit in bf16 autocast",
    "drop_in": "nextrec_fast drop-in, PyTorch loop",
    "drop_in_bf16": "drop-in, PyTorch loop, bf16 autocast",
    # Opt-in (--variants): another optimiser for the tables, so its AUC is compared, not its identity.
    "accelerated_tables": "accelerated + tables optimised in bwd",
    # Opt-in: tables stored in bf16 (embedding.cast_tables), the rest float32, nextrec's fit.
    "accelerated_bf16_tables": "accelerated, bf16 tables, nextrec's fit",
}
# --table-optimizer (accelerated_tables): name -> what the table says
TABLE_OPTIMIZERS = {
    "sparse_adam": "lazy Adam (torch.optim.SparseAdam)",
    "rowwise_adagrad": "row-wise Adagrad (nextrec_fast.optim.RowWiseAdagrad)",
    "adagrad": "Adagrad (torch.optim.Adagrad)",
    "sgd": "SGD (torch.optim.SGD)",
}


def default_table_lr(table_optimizer: str, lr: float) -> float:
    """Lazy Adam takes the dense Adam's ``lr`` (it is the same rule on the touched rows); the
    Adagrad family and SGD 0.1 (their steps shrink with the accumulated squares, or are plain)."""
    return lr if table_optimizer == "sparse_adam" else 0.1


DEFAULT_VARIANTS = ("nextrec", "accelerated", "accelerated_bf16", "drop_in", "drop_in_bf16")
BF16_VARIANTS = ("accelerated_bf16", "drop_in_bf16")  # skipped where bf16 matmuls are emulated
FIT_VARIANTS = ("nextrec", "accelerated")  # the rounding-yardstick pair
LOOP_VARIANTS = ("drop_in", "drop_in_bf16")  # our own PyTorch loop; every other variant runs nextrec's fit


def demo_model_kwargs(kind: str, targets: list[str]) -> dict:
    """The benchmark's model sizes (``nextrec_fast.bench.models``) in nextrec 0.3's argument names."""
    from nextrec_fast.bench.models import default_model_kwargs
    kwargs = default_model_kwargs(kind)
    kwargs["target"] = list(targets)
    if "task" in kwargs:
        kwargs["task"] = ["binary"] * len(targets)
    return kwargs


def _tensors(data, frame) -> tuple[dict, torch.Tensor]:
    """The frame as a batch dict of tensors (sequences padded as nextrec pads them: each row's
    first ``max_len`` ids, then its padding id) and the ``[N, T]`` float labels."""
    from nextrec_fast.integration.data import pad_sequence_column
    batch = {}
    for f in data.dense:
        batch[f["name"]] = torch.from_numpy(frame[f["name"]].to_numpy(np.float32))
    for f in data.sparse:
        batch[f["name"]] = torch.from_numpy(frame[f["name"]].to_numpy(np.int64))
    for f in data.sequence:
        batch[f["name"]] = torch.from_numpy(pad_sequence_column(frame[f["name"]], f["max_len"], f["padding_idx"]))
    labels = torch.from_numpy(frame[data.targets].to_numpy(np.float32))
    return batch, labels


def _metrics(probs: np.ndarray, labels: np.ndarray, targets: list[str]) -> dict:
    from sklearn.metrics import log_loss, roc_auc_score
    out = {}
    for t, name in enumerate(targets):
        p = np.clip(probs[:, t].astype(np.float64), 1e-7, 1 - 1e-7)
        out[name] = {"auc": float(roc_auc_score(labels[:, t], p)), "logloss": float(log_loss(labels[:, t], p, labels=[0, 1]))}
    return out


def _evaluate(model, generation, batch: dict, labels: torch.Tensor, targets, autocast: bool, chunk: int = 8192):
    model.eval()
    probs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(labels), chunk):
            part = {k: v[start:start + chunk] for k, v in batch.items()}
            probs.append(generation.probabilities(model, part).float())
    model.train()
    return _metrics(torch.cat(probs).numpy(), labels.numpy(), targets)


def _move_one_ulp(model, seed: int) -> None:
    """Every floating-point parameter element one ulp up or down (a seeded random direction)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                direction = torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
                p.copy_(torch.nextafter(p, p + direction * float("inf")))


@contextlib.contextmanager
def _quiet():
    """nextrec's fit prints its model summary, logs and bars; the demo shows its own bar instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.disable(previous)


def _bar(progress: bool, total: int, label: str, stream):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=label, unit="rows", unit_scale=True, file=stream, disable=not progress,
                leave=True, dynamic_ncols=True)


def _fit_run(model, generation, data, train_dict, test_batch, test_labels, epochs, batch_size, seed, label,
             progress, stream, autocast: bool = False):
    """Epochs of nextrec's ``fit``: (seconds per epoch, [(elapsed s, metrics)] with the untrained point).
    ``autocast``: each ``fit`` call (and the scoring) inside ``torch.autocast("cpu", torch.bfloat16)``."""
    n = len(data.train)
    curve = [(0.0, _evaluate(model, generation, test_batch, test_labels, data.targets, autocast))]
    seconds, bar_ref = [], {}
    step = model.optimizer_fn.step

    def counted_step(*args, **kwargs):
        out = step(*args, **kwargs)
        bar = bar_ref.get("bar")
        if bar is not None:
            bar.update(min(batch_size, n - bar.n))
        return out
    model.optimizer_fn.step = counted_step
    try:
        for epoch in range(epochs):
            bar_ref["bar"] = bar = _bar(progress, n, f"{label} epoch {epoch + 1}/{epochs}", stream)
            torch.manual_seed(seed + epoch)  # the same shuffle for every variant
            start = time.perf_counter()
            with _quiet(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.fit(train_dict, epochs=1, batch_size=batch_size, shuffle=True, metrics=["auc", "logloss"])
            seconds.append(time.perf_counter() - start)
            bar.close()
            curve.append((sum(seconds), _evaluate(model, generation, test_batch, test_labels, data.targets,
                                                  autocast)))
    finally:
        model.optimizer_fn.step = step
    return seconds, curve


def _loop_run(model, generation, train_batch, train_labels, test_batch, test_labels, targets, epochs, batch_size,
              lr, seed, autocast, label, progress, stream):
    """Epochs of a plain PyTorch loop: Adam, the sum of the tasks' BCE, same shuffle per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(train_labels)
    curve = [(0.0, _evaluate(model, generation, test_batch, test_labels, targets, autocast))]
    seconds = []
    model.train()
    for epoch in range(epochs):
        bar = _bar(progress, n, f"{label} epoch {epoch + 1}/{epochs}", stream)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        start = time.perf_counter()
        for first in range(0, n, batch_size):
            rows = order[first:first + batch_size]
            if len(rows) < 2:  # BatchNorm needs two rows in training
                continue
            batch = {k: v[rows] for k, v in train_batch.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                probs = generation.probabilities(model, batch)
            probs = probs.float().clamp(1e-7, 1 - 1e-7)
            loss = torch.nn.functional.binary_cross_entropy(probs, train_labels[rows], reduction="none").mean(0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(len(rows))
        seconds.append(time.perf_counter() - start)
        bar.close()
        curve.append((sum(seconds), _evaluate(model, generation, test_batch, test_labels, targets, autocast)))
    return seconds, curve


def parity(runs: dict, targets: list[str]) -> dict:
    """Per task: does the accelerated ``fit`` reach plain nextrec's test AUC, within what float32
    rounding alone produces? Each of ``runs["nextrec"]`` / ``runs["accelerated"]`` holds
    ``rounding_finals``: the final metrics of its run from the initial weights, then of its runs
    from weights moved one ulp.

    ``yardstick``: |AUC(plain, weights moved 1 ulp) - AUC(plain)|, the issue's measure, shown.
    With 3 or more runs each, the verdict is Welch's two-sample t test at a two-sided 1e-4 level
    (``bound`` = t quantile x standard error of the difference of the means): under normal AUC
    noise a correct fast path fails it once in 10,000. With fewer runs it is indicative only:
    the difference of the first runs against max(3 x yardstick, 1e-3)."""
    from scipy import stats
    out = {}
    for task in targets:
        plain = [m[task]["auc"] for m in runs["nextrec"]["rounding_finals"]]
        fast = [m[task]["auc"] for m in runs["accelerated"]["rounding_finals"]]
        yardstick = abs(plain[1] - plain[0]) if len(plain) > 1 else float("nan")
        if len(plain) >= 3 and len(fast) >= 3:
            v1, v2 = np.var(plain, ddof=1) / len(plain), np.var(fast, ddof=1) / len(fast)
            se = float(np.sqrt(v1 + v2))
            df = (v1 + v2) ** 2 / (v1 ** 2 / (len(plain) - 1) + v2 ** 2 / (len(fast) - 1)) if se > 0 else 1.0
            diff = abs(float(np.mean(fast) - np.mean(plain)))
            bound = float(stats.t.ppf(1 - 0.5e-4, df)) * se
            test = f"Welch t test over {len(plain)} + {len(fast)} runs, two-sided 1e-4"
        else:
            diff = abs(fast[0] - plain[0])
            bound = max(3 * yardstick, 1e-3) if yardstick == yardstick else 1e-3
            test = "first runs compared, indicative only: bound max(3 x yardstick, 1e-3)"
        out[task] = {"auc_difference": diff, "yardstick": yardstick, "bound": bound, "within": diff <= bound,
                     "test": test, "plain_aucs": plain, "accelerated_aucs": fast}
    return out


def run_demo(models=("mmoe", "ple", "esmm"), epochs: int = 3, batch_size: int = 2048, lr: float = 1e-3,
             variants=DEFAULT_VARIANTS, rounding_runs: int = 2, sample: int | None = None, path=None, seed: int = 0,
             progress: bool = True, stream=None, table_optimizer: str = "sparse_adam",
             table_lr: float | None = None) -> dict:
    """Train ``variants`` of each model on MovieLens-100K (``nextrec_fast.datasets.movielens_100k``)
    and score the test split after every epoch; then ``rounding_runs`` more runs of ``nextrec``
    and ``accelerated`` from weights moved one ulp (the quality yardstick; their epochs count in
    the timings too, alternating plain and accelerated). Returns a JSON-able dict: the
    environment, and per model the data summary, per variant the seconds per epoch and the
    AUC/log-loss curve of its first run, and the parity verdict when both fit variants ran.
    ``accelerated_tables``: ``accelerate(embedding_optimizer=(cls, {"lr": table_lr}))`` with the
    class ``table_optimizer`` names (``TABLE_OPTIMIZERS``; ``table_lr`` None: ``default_table_lr``),
    nextrec's Adam on the rest (issue #16's quality check: its AUC against plain nextrec's).
    ``accelerated_bf16`` and ``drop_in_bf16`` are skipped (``result["models"][kind]["skipped"]``
    says why) where bf16 matmuls run more than 2x slower than float32 (emulated).

    Raises ``FileNotFoundError`` without the data (saying how to get it), ``ImportError`` without
    nextrec, ``ValueError`` for an unknown model or variant."""
    import nextrec_fast
    from nextrec_fast.bench.common import bf16_matmul_slowdown, environment, table_optimizer_class
    from nextrec_fast.compat import installed_generation
    from nextrec_fast.datasets import movielens_100k
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"unknown table_optimizer {table_optimizer!r}: expected one of {list(TABLE_OPTIMIZERS)}")
    if table_lr is None:
        table_lr = default_table_lr(table_optimizer, lr)
    if epochs < 1 or rounding_runs < 0:
        raise ValueError(f"epochs must be >= 1 and rounding_runs >= 0, got {epochs} and {rounding_runs}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: expected some of {list(VARIANTS)}")
    stream = stream or sys.stderr
    generation = installed_generation()
    import nextrec
    env = {**environment(torch.device("cpu")), "nextrec": getattr(nextrec, "__version__", generation.name),
           "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "sample": sample,
           "rounding_runs": rounding_runs, "table_optimizer": table_optimizer, "table_lr": table_lr}
    result = {"environment": env, "models": {}}
    for kind in models:
        data = movielens_100k(kind, path=path, sample=sample, seed=seed)
        if progress:
            print(f"[{kind}] MovieLens-100K: {data.info['train_rows']} train / {data.info['test_rows']} test rows, "
                  f"targets {data.targets}", file=stream, flush=True)
        features = generation.features(data.dense, data.sparse, data.sequence)
        kwargs = generation.model_arguments(kind, demo_model_kwargs(kind, data.targets))
        if generation.name == "0.6":
            # 0.6's MLPs default to no norm, and then barely learn in a few epochs from its 1e-4-scaled
            # embeddings (test AUC < 0.5 after one); BatchNorm, 0.3's default, keeps the demos alike.
            kwargs = {k: _with_batch_norm(v) if "mlp_params" in k else v for k, v in kwargs.items()}
        cls = generation.model_class(kind)
        torch.manual_seed(seed)
        initial = copy.deepcopy(cls(*copy.deepcopy(features), **kwargs).state_dict())
        train_dict = data.as_dict(data.train)
        train_batch, train_labels = _tensors(data, data.train)
        test_batch, test_labels = _tensors(data, data.test)
        runs, skipped = {}, {}
        fit_variants = [v for v in variants if v in FIT_VARIANTS]
        schedule = [(v, 0) for v in variants] + [(v, k) for k in range(1, rounding_runs + 1) for v in fit_variants]
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # nextrec writes logs and checkpoints under the working directory
            try:
                for variant, ulp_seed in schedule:
                    label = f"[{kind}] {variant}" + (f" (weights 1 ulp moved, #{ulp_seed})" if ulp_seed else "")
                    if variant in BF16_VARIANTS:
                        slowdown = bf16_matmul_slowdown()
                        if slowdown > 2:  # emulated bf16: the variant would only show the CPU's lack of it
                            skipped[variant] = (f"bf16 matmuls run {slowdown:.0f}x slower than float32 on this "
                                                "CPU (no AMX / AVX512-BF16): skipped")
                            if progress:
                                print(f"{label}: {skipped[variant]}", file=stream, flush=True)
                            continue
                    if variant not in LOOP_VARIANTS:
                        model_kwargs = kwargs
                        if variant == "accelerated_tables" and generation.name == "0.3":
                            # 0.3.1 regularises tables by default (L1 1e-6, L2 1e-5): that needs their
                            # dense gradient, which the in-backward optimiser never makes.
                            model_kwargs = {**kwargs, "embedding_l1_reg": 0.0, "embedding_l2_reg": 0.0}
                        model = cls(*copy.deepcopy(features), **model_kwargs)
                        model.load_state_dict(initial)
                        if ulp_seed:
                            _move_one_ulp(model, seed * 1000 + ulp_seed)
                        with _quiet():
                            model.compile(optimizer="adam", optimizer_params={"lr": lr}, loss="bce")
                        if variant == "accelerated_tables":
                            nextrec_fast.accelerate(model, embedding_optimizer=(table_optimizer_class(table_optimizer),
                                                                                {"lr": table_lr}))
                        elif variant != "nextrec":
                            nextrec_fast.accelerate(model)
                        if variant == "accelerated_bf16_tables":  # before Adam's first step: state in bf16
                            model.embedding.cast_tables(torch.bfloat16)
                        seconds, curve = _fit_run(model, generation, data, train_dict, test_batch, test_labels, epochs,
                                                  batch_size, seed, label, progress, stream,
                                                  autocast=variant == "accelerated_bf16")
                    else:
                        with _quiet():
                            model = getattr(nextrec_fast, kind.upper())(*copy.deepcopy(features), **kwargs)
                        model.load_state_dict(initial)
                        seconds, curve = _loop_run(model, generation, train_batch, train_labels, test_batch,
                                                   test_labels, data.targets, epochs, batch_size, lr, seed,
                                                   variant == "drop_in_bf16", label, progress, stream)
                    del model
                    if ulp_seed == 0:
                        runs[variant] = {"epoch_seconds": [round(s, 3) for s in seconds], "curve": curve,
                                         "final": curve[-1][1], "rounding_finals": [curve[-1][1]]}
                    else:
                        runs[variant]["epoch_seconds"] += [round(s, 3) for s in seconds]
                        runs[variant]["rounding_finals"].append(curve[-1][1])
            finally:
                os.chdir(cwd)
        entry = {"data": data.info, "runs": runs, "skipped": skipped}
        if all(v in runs for v in FIT_VARIANTS) and rounding_runs >= 1:  # no yardstick, no verdict
            entry["parity"] = parity(runs, data.targets)
        result["models"][kind] = entry
    return result


def _with_batch_norm(params):
    return [_with_batch_norm(p) for p in params] if isinstance(params, list) else {**params, "norm_type": "batch_norm"}


def format_demo(result: dict) -> str:
    env = result["environment"]
    lines = [f"MovieLens-100K, nextrec {env['nextrec']}, torch {env['torch']}, {env['threads']} threads on "
             f"{env['cores']} cores, batch {env['batch_size']}, {env['epochs']} epochs"
             + (f", first {env['sample']} ratings" if env.get("sample") else ""),
             "s/epoch: median over all epochs of all runs [min-max]; speed-up: plain nextrec's median / the "
             "variant's; AUC and log-loss on the test split (the last 20% of ratings in time) after the last epoch "
             "of the first run"]
    for kind, entry in result["models"].items():
        runs = entry["runs"]
        targets = list(next(iter(runs.values()))["final"])
        header = f"{'variant':<45} {'s/epoch':>20} {'speed-up':>8}" + "".join(f" {t + ' AUC':>15} {'log-loss':>9}"
                                                                         for t in targets)
        lines += ["", f"{kind.upper()}  ({entry['data']['train_rows']} train rows, {entry['data']['test_rows']} test rows)",
                  header, "-" * len(header)]
        base = statistics.median(runs["nextrec"]["epoch_seconds"]) if "nextrec" in runs else None
        for variant, run in runs.items():
            secs = run["epoch_seconds"]
            median = statistics.median(secs)
            speed = f"{base / median:.2f}x" if base else "-"
            cells = "".join(f" {run['final'][t]['auc']:>15.4f} {run['final'][t]['logloss']:>9.4f}" for t in targets)
            lines.append(f"{VARIANTS[variant]:<45} {median:>7.2f} [{min(secs):.2f}-{max(secs):.2f}] {speed:>8}{cells}")
        for variant, why in entry.get("skipped", {}).items():
            lines.append(f"{VARIANTS[variant]:<45} {why}")
        if "accelerated_tables" in runs and "nextrec" in runs:
            env = result["environment"]
            words = TABLE_OPTIMIZERS[env.get("table_optimizer", "rowwise_adagrad")]  # older JSON: row-wise
            lines.append(f"  tables by {words} in the backward (lr {env['table_lr']}) against "
                         "plain nextrec's Adam, test AUC difference: " + ", ".join(
                             f"{t} {runs['accelerated_tables']['final'][t]['auc'] - runs['nextrec']['final'][t]['auc']:+.4f}"
                             for t in targets))
        if "parity" not in entry and all(v in runs for v in FIT_VARIANTS):
            lines.append("  no quality verdict: it needs the rounding yardstick (--rounding-runs 1 or more)")
        if "parity" in entry:
            for task, p in entry["parity"].items():
                plain, fast = p["plain_aucs"], p["accelerated_aucs"]
                verdict = "same quality" if p["within"] else "DIFFERENT"
                lines.append(f"  {task}: test AUC plain {np.mean(plain):.4f} ({len(plain)} run(s), "
                             f"{min(plain):.4f}-{max(plain):.4f}), accelerated {np.mean(fast):.4f} ({len(fast)} run(s), "
                             f"{min(fast):.4f}-{max(fast):.4f}); rounding yardstick |AUC(1 ulp) - AUC(plain)| = "
                             f"{p['yardstick']:.4f}; difference {p['auc_difference']:.4f} vs bound {p['bound']:.4f} "
                             f"({p['test']}): {verdict}")
    return "\n".join(lines)
