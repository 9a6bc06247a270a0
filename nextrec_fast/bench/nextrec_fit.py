"""``nextrec-fast bench --nextrec``: nextrec's own ``fit``, plain vs accelerated, on whichever
nextrec generation is installed: the median step and the epoch's wall time as a user sees it."""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import asdict

import torch

from nextrec_fast.bench.common import CONFIGS, default_features, environment, machine_load, make_batch
from nextrec_fast.bench.models import default_model_kwargs, make_row, nextrec_model

__all__ = ["run_nextrec"]


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
    env = {**environment(torch.device("cpu")), "config": config, "steps_per_epoch": steps, "repeats": rounds}
    rows = []
    for model in models:
        kwargs = default_model_kwargs(model)
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # nextrec writes logs and checkpoints under the working directory
            try:
                plain = nextrec_model(model, features, kwargs, seed=0)
                fast = nextrec_model(model, features, kwargs, seed=0)
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
            rows.append(make_row(model, mode, batch, "plain nextrec", {"plain": plain_samples, "fast": fast_samples},
                                 "plain", digits=1))
        del plain, fast, data
        gc.collect()
    env["load_at_end"] = round(machine_load()[0], 2)
    try:
        import nextrec
        env["nextrec"] = getattr(nextrec, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    return {"environment": env, "rows": [asdict(r) for r in rows]}
