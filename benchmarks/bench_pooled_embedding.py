"""Benchmark: one-call pooled_embedding vs nextrec-style pooling vs F.embedding_bag per feature.

A thin wrapper over ``nextrec_fast.bench.pooling`` (the same rows as the pooling table of
``nextrec-fast bench``; see that module for what is timed). Default feature set: 26 sparse
features (vocab 1e3..1e6 log-spaced, dim 16, one id each) and 3 sequence features (vocab 1e5,
dim 16, max_len 50, about half padding, mean combiner), fp32, batch 2048 and 8192.

    python benchmarks/bench_pooled_embedding.py [--batches 2048 8192] [--repeats 7] [--threads N]
"""
from __future__ import annotations

import argparse
import json

import torch

from nextrec_fast.bench import pooling as benchmark_pooling
from nextrec_fast.bench.common import CONFIGS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=list(benchmark_pooling.DEFAULT_BATCHES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = benchmark_pooling.run(batches=args.batches, device=args.device, repeats=args.repeats,
                                   warmup=args.warmup, config=args.config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(benchmark_pooling.format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
