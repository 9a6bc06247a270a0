"""One training step in one process with TorchRec's tables (``nextrec_fast.sharding``).

Three variants of one nextrec model (the installed generation, the bench's default features),
timed interleaved, each ``zero_grad`` + forward + BCE + backward + dense Adam(fused):

- ``nextrec dense + TorchRec tables``: the tables in TorchRec (DMP over one process, FBGEMM's
  fused row-wise Adagrad in the backward) under nextrec's own dense forward: the same model with
  TorchRec's embedding modules, what a TorchRec user of nextrec has without us (the baseline);
- ``fast dense + TorchRec tables``: the same DMP, our batched experts / gates / towers;
- ``fast, own tables``: no TorchRec: our pooling op with row-wise Adagrad in its backward
  (``nextrec_fast.optim``).

The TorchRec variants take a ``KeyedJaggedTensor`` built once outside the timing (in a real
loader ``KJTCollate`` does it in the data path); the last takes nextrec's padded ids.

    python -m nextrec_fast.bench.torchrec_tables [--model mmoe] [--batch-size 2048] [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys

import torch
import torch.nn.functional as F

from nextrec_fast.bench.common import (CONFIGS, add_timing_arguments, default_features, environment, machine_load,
                                       make_batch, reliability_warnings, report, spread, time_interleaved)
from nextrec_fast.bench.models import default_model_kwargs, installed_nextrec, nextrec_model

BASELINE = "nextrec dense + TorchRec tables"


def _single_process_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)


def run(model: str = "mmoe", batch: int = 2048, repeats: int = 7, warmup: int = 2, config: str = "default") -> dict:
    import nextrec_fast
    from nextrec_fast import optim, sharding
    from nextrec_fast.backend import use_backend
    from torchrec.optim import RowWiseAdagrad

    found = installed_nextrec()
    if found is None:
        raise SystemExit("this benchmark needs nextrec (0.6.x or 0.3.x) and TorchRec: see docs/sharding.md")
    generation, version = found
    _single_process_group()
    device = torch.device("cpu")
    env = {**environment(device), "config": config, "repeats": repeats, "nextrec": version}
    features = default_features(**CONFIGS[config])
    plain = nextrec_model(model, features, default_model_kwargs(model), seed=0)
    x, labels = make_batch(*features, batch=batch, device=device)
    logits = generation.name != "0.3"  # 0.6's forward gives logits (its head is call_model's)

    def loss_of(out):
        out = torch.cat(out, 1) if isinstance(out, (list, tuple)) else out
        if logits:
            return F.binary_cross_entropy_with_logits(out, labels)
        return F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), labels)

    own = nextrec_fast.accelerate(copy.deepcopy(plain))
    tables = own.embedding.tables()
    optim.apply_optimizer_in_backward(optim.RowWiseAdagrad, tables, {"lr": 0.01})
    own_dense = torch.optim.Adam([p for p in own.parameters() if all(p is not t for t in tables)], lr=1e-3, fused=True)

    fast = nextrec_fast.accelerate(copy.deepcopy(plain))
    del plain
    dmp = sharding.shard_model(fast, sharding="table_wise", table_optimizer=(RowWiseAdagrad, {"lr": 0.01}))
    dmp_dense = torch.optim.Adam(sharding.dense_parameters(dmp).values(), lr=1e-3, fused=True)
    kjt_batch = sharding.KJTCollate(fast, collate=None)(x)
    own.train(), dmp.train()

    def step(module, optimizer, batch_in, reference: bool = False):
        def run_step():
            optimizer.zero_grad(set_to_none=True)
            if reference:
                with use_backend("reference"):  # nextrec's own forward (and its layers' backward)
                    loss = loss_of(module(batch_in))
            else:
                loss = loss_of(module(batch_in))
            loss.backward()
            optimizer.step()
        return run_step

    fns = {BASELINE: step(dmp, dmp_dense, kjt_batch, reference=True),
           "fast dense + TorchRec tables": step(dmp, dmp_dense, kjt_batch),
           "fast, own tables": step(own, own_dense, x)}
    samples = time_interleaved(fns, device, warmup=warmup, repeats=repeats, shuffle_seed=0)
    base = statistics.median(samples[BASELINE])
    rows = [dict(variant=name, ms=statistics.median(s), samples_ms=s, speedup=base / statistics.median(s))
            for name, s in samples.items()]
    env["load_at_end"] = round(machine_load()[0], 2)
    return dict(environment=env, model=model, batch=batch, rows=rows,
                warnings=reliability_warnings(env, [(r["variant"], r["samples_ms"]) for r in rows]))


def format_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"{result['model']} train step, batch {result['batch']}, one process, {env.get('threads')} thread(s), "
             f"nextrec {env['nextrec']}: medians of {env['repeats']} interleaved repeats [min-max], "
             f"speed-up over '{BASELINE}'",
             f"{'variant':34s} {'ms':>9s} {'[min-max]':>17s} {'speed-up':>9s}"]
    for r in result["rows"]:
        lo, hi = spread(r["samples_ms"])
        lines.append(f"{r['variant']:34s} {r['ms']:9.1f} {f'[{lo:.1f}-{hi:.1f}]':>17s} {r['speedup']:8.2f}x")
    lines += result["warnings"]  # each starts "WARNING:"
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="mmoe", choices=["mmoe", "ple", "esmm"])
    add_timing_arguments(parser, repeats=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.model, args.batch_size, args.repeats, args.warmup, args.config)
    report(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
