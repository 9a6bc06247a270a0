"""Command line: ``nextrec-fast bench|plot|profile|demo [...]`` (also ``python -m nextrec_fast ...``)."""
from __future__ import annotations

import argparse
import sys


def _set_threads(threads: int | None) -> None:
    import torch

    from nextrec_fast.bench.common import default_threads, machine_load
    load, cores = machine_load()
    if load > cores:  # first, not only after the tables: a reader may stop at the first table
        print(f"WARNING: the machine is busy (load average {load:.1f} on {cores} core(s)): timings will be slow "
              "and ratios unreliable; rerun when it is idle", file=sys.stderr)
    if not threads:
        threads = default_threads()
        if threads < cores:  # say why, or a user compares against 2-thread numbers unawares
            print(f"using {threads} torch thread(s): {cores} cores less the load average {load:.1f} "
                  f"(other work); --threads {cores} to override", file=sys.stderr)
    torch.set_num_threads(threads)


def _bench(args) -> int:
    from nextrec_fast.bench import common, models as benchmark
    _set_threads(args.threads)
    if args.nextrec:
        if args.autocast != "none":
            print("bench --nextrec times nextrec's own fit, which runs in float32; --autocast applies to the model "
                  "rows (bench without --nextrec)", file=sys.stderr)
            return 2
        try:
            import nextrec  # noqa: F401
        except ImportError:
            print("bench --nextrec needs nextrec (0.6.x or 0.3.x): see the README's install commands", file=sys.stderr)
            return 2
        models = [m for m in args.model if m != "pooling"]
        models = [m for m in models if m != "esmm"] if models == list(benchmark.MODEL_NAMES) else models
        from nextrec_fast.bench.nextrec_fit import run_nextrec
        if args.batch_size and len(args.batch_size) > 1:
            print("bench --nextrec takes one --batch-size", file=sys.stderr)
            return 2
        result = run_nextrec(models=models, batch=args.batch_size[0] if args.batch_size else 2048, steps=args.steps,
                                       rounds=args.repeats, progress=not args.quiet, config=args.config)
    else:
        # --batch-size: the models' batches (default 2048) and the pooling's (default 2048 and 8192).
        result = benchmark.run(models=args.model, modes=args.mode, batch=args.batch_size or [2048], device=args.device,
                               repeats=args.repeats, warmup=args.warmup, progress=not args.quiet, config=args.config,
                               pooling_batches=args.batch_size or None, against_nextrec=not args.reference,
                               autocast=args.autocast)
    print(benchmark.format_table(result))
    if args.json:
        common.save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot and not result["rows"]:
        print("--plot: no model rows to draw (the chart shows the models' speed-ups)", file=sys.stderr)
    elif args.plot:
        from nextrec_fast.bench import plotting
        plotting.plot_speedups(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot(args) -> int:
    from nextrec_fast.bench import plotting
    plotting.plot_json(args.results, args.out)
    print(f"wrote {args.out}")
    return 0


def _profile(args) -> int:
    from nextrec_fast.bench import profiling
    _set_threads(args.threads)
    result = profiling.profile_model(model=args.model, device=args.device, steps=args.steps, batch=args.batch_size,
                                     config=args.config, out_dir=args.out, top=args.top)
    print(profiling.format_profile(result))
    return 0


def _demo(args) -> int:
    from nextrec_fast.bench import common
    _set_threads(args.threads)
    try:
        from nextrec_fast.compat import installed_generation
        installed_generation()
        from nextrec_fast.datasets import find_movielens_100k
        find_movielens_100k(args.data)
    except (ImportError, FileNotFoundError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    from nextrec_fast.bench.demo import format_demo, run_demo
    result = run_demo(models=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      variants=args.variants, rounding_runs=args.rounding_runs, sample=args.sample, path=args.data,
                      seed=args.seed, table_optimizer=args.table_optimizer, table_lr=args.table_lr,
                      progress=not args.quiet)
    print(format_demo(result))
    if args.json:
        common.save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from nextrec_fast.bench import plotting
        plotting.plot_demo(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def main(argv=None) -> int:
    from nextrec_fast.bench.common import CONFIGS
    from nextrec_fast.bench.models import AUTOCAST, BENCH_CHOICES, MODEL_NAMES, MODES
    parser = argparse.ArgumentParser(prog="nextrec-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time the installed nextrec (else the reference) vs the fast ESMM/MMOE/PLE, "
                                          "with each step's GEMM floor, and the embedding pooling, on the default config")
    bench.add_argument("--model", nargs="+", choices=BENCH_CHOICES, default=list(BENCH_CHOICES),
                       help="pooling: the embedding pooling alone, nextrec-style vs the fused op vs one "
                            "F.embedding_bag per feature, forward and forward+backward (default: all)")
    bench.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                       help="forward_eval: eval-mode forward; forward_backward: train-mode forward + BCE + backward; "
                            "train_step: that plus torch's default Adam on every parameter; train_step_fused_tables: "
                            "Adam(fused=True), and for the fast model row-wise Adagrad on the tables inside the "
                            "pooling backward (nextrec_fast.optim); train_step_lazy_adam: the same with lazy Adam "
                            "(SparseAdam's rule, lr 1e-3) on the tables (default: all)")
    bench.add_argument("--batch-size", type=int, nargs="+", default=None,
                       help="one or more batch sizes, e.g. 64 256 2048 8192 for a scaling table (default: 2048 "
                            "for the models; 2048 and 8192 for pooling)")
    bench.add_argument("--reference", action="store_true",
                       help="speed-ups over the reference (nextrec's math re-implemented) even where nextrec is "
                            "installed (default: over the installed nextrec, else the reference)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--autocast", choices=list(AUTOCAST), default="none",
                       help="bf16: every model variant under torch.autocast(device, torch.bfloat16) (float32 weights, "
                            "bfloat16 GEMMs; fast on CPUs with AMX or AVX512-BF16, emulated and very slow without), "
                            "with the baseline (nextrec, else the reference) also timed in float32 in the same loop: "
                            "columns 'vs nextrec bf16' and 'vs nextrec fp32'. Not with --nextrec (nextrec's fit runs in "
                            "float32) (default: none)")
    bench.add_argument("--config", choices=sorted(CONFIGS), default="default",
                       help="default: the realistic config (26 sparse, 3 sequence, 13 dense features; "
                            "docs/benchmarks.md); small: a seconds-long smoke test")
    bench.add_argument("--repeats", type=int, default=5,
                       help="timed samples per implementation and row, interleaved (the median is reported, the "
                            "min-max beside it); with --nextrec: epochs per variant (default: 5)")
    bench.add_argument("--warmup", type=int, default=2,
                       help="untimed rounds before the samples, so allocators and caches settle (default: 2)")
    bench.add_argument("--threads", type=int, default=0,
                       help="torch threads (default: the cores the machine can give now: its cores less its load "
                            "average, at least 1; more threads than free cores make every timing erratic)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--plot", default=None, metavar="PATH",
                       help="also draw the speed-ups as a PNG bar chart (needs matplotlib)")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.add_argument("--nextrec", action="store_true",
                       help="time nextrec's own fit, plain vs nextrec_fast.accelerate, on the installed nextrec "
                            "(0.3.x or 0.6.x): the median step and the epoch's wall time (data preparation, steps, "
                            "checkpoint); --repeats is then the number of epochs each, --steps the steps per epoch")
    bench.add_argument("--steps", type=int, default=8, help="with --nextrec: training steps (batches) per epoch")
    bench.set_defaults(func=_bench)

    plot = sub.add_parser("plot", help="redraw a chart from a `bench --json` (speed-up bars) or `demo --json` (AUC "
                                       "curves) file")
    plot.add_argument("results", metavar="RESULTS.json", help="a file written by bench --json or demo --json")
    plot.add_argument("--out", required=True, metavar="PATH", help="PNG to write")
    plot.set_defaults(func=_plot)

    prof = sub.add_parser("profile", help="profile training steps of reference vs fast: Chrome traces and "
                                          "time per stage (embedding/experts/gates/towers/backward/optimizer)")
    prof.add_argument("--model", choices=MODEL_NAMES, default="mmoe", help="the model to profile (default: mmoe)")
    prof.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    prof.add_argument("--steps", type=int, default=3, help="profiled training steps (after one warm-up step)")
    prof.add_argument("--batch-size", type=int, default=2048, help="rows per training step (default: 2048)")
    prof.add_argument("--config", choices=sorted(CONFIGS), default="default",
                      help="default: the realistic config (26 sparse, 3 sequence, 13 dense features; "
                           "docs/benchmarks.md); small: seconds-long")
    prof.add_argument("--out", default="nextrec_fast_profile", metavar="DIR",
                      help="folder for the Chrome traces <model>_{reference,fast}_trace.json")
    prof.add_argument("--top", type=int, default=5, help="heaviest ops listed per stage")
    prof.add_argument("--threads", type=int, default=0,
                      help="torch threads (default: the cores the machine can give now, as for bench)")
    prof.set_defaults(func=_profile)

    from nextrec_fast.bench.demo import DEFAULT_VARIANTS, TABLE_OPTIMIZERS, VARIANTS
    demo = sub.add_parser("demo", description="Multi-task training on MovieLens-100K: plain nextrec's fit, the same "
                                              "model after accelerate(), the drop-in in a PyTorch loop; seconds per "
                                              "epoch, test AUC / log-loss, and a quality verdict against the "
                                              "rounding yardstick.", help="train on MovieLens-100K: plain nextrec vs accelerated vs the drop-in, "
                                       "seconds per epoch and test AUC / log-loss per task (needs nextrec and the "
                                       "data: pip install --no-deps recbole==1.2.1)")
    demo.add_argument("--model", nargs="+", choices=["mmoe", "ple", "esmm"], default=["mmoe", "ple", "esmm"],
                      help="models to train (default: all three; ESMM on an impression space with sampled "
                           "unrated movies)")
    demo.add_argument("--epochs", type=_at_least(1), default=3, help="epochs per variant (default: 3)")
    demo.add_argument("--batch-size", type=int, default=2048, help="rows per training step (default: 2048, as bench)")
    demo.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    demo.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                      help="; ".join(f"{k}: {v}" for k, v in VARIANTS.items())
                      + f" (default: {' '.join(DEFAULT_VARIANTS)})")
    demo.add_argument("--table-optimizer", choices=list(TABLE_OPTIMIZERS), default="sparse_adam",
                      help="accelerated_tables: the tables' optimiser in the backward: "
                           + "; ".join(f"{k}: {v}" for k, v in TABLE_OPTIMIZERS.items()) + " (default: sparse_adam)")
    demo.add_argument("--table-lr", type=float, default=None,
                      help="accelerated_tables: the tables' learning rate (default: --lr for sparse_adam, else 0.1)")
    demo.add_argument("--rounding-runs", type=_at_least(0), default=2, metavar="K",
                      help="K more runs of nextrec and of accelerated from the initial weights moved one ulp: the "
                           "yardstick of how far float32 rounding alone moves test AUC; with K >= 2 the verdict is "
                           "a Welch t test at a two-sided 1e-4 level, with K = 1 indicative only, with K = 0 none (default: 2)")
    demo.add_argument("--sample", type=_at_least(1000), default=None, metavar="N",
                      help="only the first N >= 1000 ratings in time order (a quick run; default: all 100,000)")
    demo.add_argument("--data", default=None, metavar="PATH",
                      help="a folder or recbole wheel with ml-100k.{inter,user,item} (default: $NEXTREC_FAST_ML100K, "
                           "else the installed recbole package's copy)")
    demo.add_argument("--seed", type=int, default=0, help="initial weights, batch order, ESMM's sampled negatives")
    demo.add_argument("--threads", type=int, default=0,
                      help="torch threads (default: the cores the machine can give now, as for bench)")
    demo.add_argument("--json", default=None, metavar="PATH", help="also write the results (curves included) as JSON")
    demo.add_argument("--plot", default=None, metavar="PATH",
                      help="also draw test AUC against training time as a PNG (needs matplotlib)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
