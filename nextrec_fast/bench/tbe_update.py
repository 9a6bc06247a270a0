"""Pooling forward + backward + table update, side by side with FBGEMM's CPU table-batched
embedding (TBE) and its fused optimiser, on the bench's default features.

One table per feature (default config: 26 sparse + 3 sequence features, 29 tables, ~72M
parameters; small: 8). Per optimiser (``sgd``: FBGEMM's EXACT_SGD; ``rowwise_adagrad``:
EXACT_ROWWISE_ADAGRAD, ours ``nextrec_fast.optim.RowWiseAdagrad``), timed interleaved in one process:

- ``FBGEMM TBE, fused``: ``SplitTableBatchedEmbeddingBagsCodegen`` on the host (fbgemm-gpu-cpu),
  one table per feature, MEAN pooling (a sparse feature's one id: MEAN = SUM), jagged ids with
  the padding dropped (built outside the timing), its optimiser fused in the backward (the
  baseline, when fbgemm is installed);
- ``ours, in backward``: nextrec_fast's pooling op on nextrec's padded ids, the same optimiser
  inside its backward (``nextrec_fast.optim.apply_optimizer_in_backward``);
- ``ours, dense gradients``: the op's dense ``[V, D]`` table gradients, then the torch optimiser
  (``torch.optim.SGD``, or ``RowWiseAdagrad`` over every row): what a plain training loop does.

Each step: the forward, ``backward`` of a fixed random output gradient, the update. Same tables,
ids and learning rate everywhere. ``--device cuda``: the same on the GPU (our CUDA kernels;
FBGEMM's row only where a CUDA fbgemm-gpu is installed, its tables in device memory).

    python -m nextrec_fast.bench.tbe_update [--batch-size 2048] [--threads 1] [--repeats 9] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from nextrec_fast.bench.common import (CONFIGS, add_timing_arguments, default_features, environment, machine_load,
                                       reliability_warnings, report, spread, time_interleaved)
from nextrec_fast.bench.pooling import fused_pooling, make_ids, make_tables, to_jagged

OPTIMIZERS = ("sgd", "rowwise_adagrad")
LR = 0.01


def _fbgemm():
    """FBGEMM's TBE classes, or None (with the reason) when fbgemm-gpu(-cpu) is not importable."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                            SplitTableBatchedEmbeddingBagsCodegen)
    except Exception as e:  # ImportError, or OSError on a torch it was not built for
        return None, f"{type(e).__name__}: {str(e)[:120]}"
    return (SplitTableBatchedEmbeddingBagsCodegen, EmbOptimType, EmbeddingLocation, PoolingMode, ComputeDevice), None


def run(batch: int = 2048, repeats: int = 9, warmup: int = 2, config: str = "default", device="cpu") -> dict:
    from nextrec_fast import optim

    device = torch.device(device)
    env = {**environment(device), "config": config, "repeats": repeats}
    _, sparse, sequence = default_features(**CONFIGS[config])
    features = list(sparse) + list(sequence)
    sparse_ids, seq_ids = make_ids(sparse, sequence, batch, device)
    width = sum(f.embedding_dim for f in features)
    grad = torch.randn(batch, width, generator=torch.Generator().manual_seed(2)).to(device)
    fbgemm, missing = _fbgemm()
    env["fbgemm"] = missing or "installed"
    # One draw of the initial weights: every variant starts from a copy of it.
    initial = [t.detach() for t in make_tables(sparse, sequence, device)]

    def fresh_tables():
        return [torch.nn.Parameter(t.clone()) for t in initial]

    def ours_in_backward(rule):
        tables = fresh_tables()
        cls = torch.optim.SGD if rule == "sgd" else optim.RowWiseAdagrad
        optim.apply_optimizer_in_backward(cls, tables, {"lr": LR})

        def step():
            fused_pooling(tables, sparse, sequence, sparse_ids, seq_ids).backward(grad)
        return step

    def ours_dense(rule):
        tables = fresh_tables()
        opt = (torch.optim.SGD if rule == "sgd" else optim.RowWiseAdagrad)(tables, lr=LR)

        def step():
            opt.zero_grad(set_to_none=False)  # the gradient buffers stay, as in a training loop
            fused_pooling(tables, sparse, sequence, sparse_ids, seq_ids).backward(grad)
            opt.step()
        return step

    # FBGEMM's input: the ids jagged, padding dropped, built once outside the timing.
    jagged = to_jagged(sequence, sparse_ids, seq_ids)
    values = torch.cat([v.cpu() for v, _ in jagged])
    lengths = torch.cat([torch.diff(o.cpu(), append=torch.tensor([len(v)])) for v, o in jagged])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values, offsets = values.to(device), offsets.to(device)
    on_cuda = device.type == "cuda"

    def fbgemm_fused(rule):
        tbe_class, opt_type, location, pooling, compute = fbgemm
        tbe = tbe_class([(f.vocab_size, f.embedding_dim, location.DEVICE if on_cuda else location.HOST,
                          compute.CUDA if on_cuda else compute.CPU) for f in features],
                        device=device, optimizer=opt_type.EXACT_SGD if rule == "sgd" else opt_type.EXACT_ROWWISE_ADAGRAD,
                        learning_rate=LR, eps=1e-8, pooling_mode=pooling.MEAN)
        with torch.no_grad():  # the same initial weights as ours (one table per feature, in order)
            for t, w in zip(tbe.split_embedding_weights(), initial):
                t.copy_(w)

        def step():
            tbe(values, offsets).backward(grad)
        step.forward = lambda: tbe(values, offsets)
        return step

    fns = {}
    for rule in OPTIMIZERS:
        if fbgemm is not None:
            try:
                fns[(rule, "FBGEMM TBE, fused")] = fbgemm_fused(rule)
            except Exception as e:  # e.g. fbgemm-gpu-cpu asked for CUDA tables: our rows only
                fbgemm, env["fbgemm"] = None, f"{type(e).__name__}: {str(e)[:120]}"
                fns = {k: f for k, f in fns.items() if k[1] != "FBGEMM TBE, fused"}
        fns[(rule, "ours, in backward")] = ours_in_backward(rule)
        fns[(rule, "ours, dense gradients")] = ours_dense(rule)
    if fbgemm is not None:  # the same pooling on both sides, before any update
        with torch.no_grad():
            ours = fused_pooling(initial, sparse, sequence, sparse_ids, seq_ids)
            env["max_abs_forward_difference"] = float((fns[(OPTIMIZERS[0], "FBGEMM TBE, fused")].forward() - ours).abs().max())
    samples = time_interleaved(fns, device, warmup=warmup, repeats=repeats, shuffle_seed=0)
    rows = []
    for rule in OPTIMIZERS:
        base_key = (rule, "FBGEMM TBE, fused") if fbgemm is not None else (rule, "ours, dense gradients")
        base = statistics.median(samples[base_key])
        for (r, variant), s in samples.items():
            if r == rule:
                rows.append(dict(optimizer=rule, variant=variant, ms=statistics.median(s), samples_ms=s,
                                 vs_baseline=base / statistics.median(s), baseline=base_key[1]))
    env["load_at_end"] = round(machine_load()[0], 2)
    return dict(environment=env, batch=batch, features=len(features), rows=rows,
                warnings=reliability_warnings(env, [(f"{r['optimizer']} {r['variant']}", r["samples_ms"]) for r in rows]))


def format_table(result: dict) -> str:
    env = result["environment"]
    baseline = result["rows"][0]["baseline"]
    lines = [f"pooling forward + backward + table update, {result['features']} features, batch {result['batch']}, "
             f"{env.get('threads')} thread(s): medians of {env['repeats']} interleaved repeats [min-max]; "
             f"speed-up over '{baseline}' with the same optimiser" + ("" if env["fbgemm"] == "installed" else
                                              f" (FBGEMM not importable: {env['fbgemm']})"),
             f"{'optimizer':16s} {'variant':24s} {'ms':>8s} {'[min-max]':>15s} {'speed-up':>9s}"]
    for r in result["rows"]:
        lo, hi = spread(r["samples_ms"])
        lines.append(f"{r['optimizer']:16s} {r['variant']:24s} {r['ms']:8.2f} {f'[{lo:.1f}-{hi:.1f}]':>15s} "
                     f"{r['vs_baseline']:8.2f}x")
    if "max_abs_forward_difference" in env:
        lines.append(f"FBGEMM's and our pooled outputs before training differ by at most {env['max_abs_forward_difference']:.1e}")
    lines += result["warnings"]  # each starts "WARNING:"
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=intro, epilog=rest.rsplit("\n\n", 1)[0],
                                     formatter_class=_HelpFormatter)
    add_timing_arguments(parser, repeats=9)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: FBGEMM's CPU kernels and ours on one core each)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: our CUDA kernels (and FBGEMM's, if its "
                        "CUDA build is installed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.batch_size, args.repeats, args.warmup, args.config, args.device)
    report(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
