"""Command line: ``nextrec-fast bench [...]`` (also ``python -m nextrec_fast bench``)."""
from __future__ import annotations

import argparse
import sys


def _bench(args) -> int:
    from nextrec_fast import benchmark
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = benchmark.run(models=args.model, modes=args.mode, batch=args.batch_size, device=args.device,
                           repeats=args.repeats, warmup=args.warmup, progress=not args.quiet, config=args.config)
    print(benchmark.format_table(result))
    if args.json:
        benchmark.save_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    from nextrec_fast.benchmark import CONFIGS, MODEL_NAMES, MODES
    parser = argparse.ArgumentParser(prog="nextrec-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time reference vs fast ESMM/MMOE/PLE on the default config")
    bench.add_argument("--model", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    bench.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    bench.add_argument("--batch-size", type=int, default=2048)
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--config", choices=sorted(CONFIGS), default="default",
                       help="default: the realistic config of the README; small: a seconds-long smoke test")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave as is)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
