"""Benchmark: one-call pooled_embedding vs nextrec-style pooling vs F.embedding_bag per feature.

Default feature set: 26 sparse features (vocab 1e3..1e6 log-spaced, dim 16, one id each) and 3
sequence features (vocab 1e5, dim 16, max_len 50, about half padding, mean combiner), fp32,
batch 2048 and 8192. Rows:

- nextrec: nextrec 0.3.1's formulas (lookup -> [B, L, D], mask, bmm, / (count + 1e-16), cat);
- fused: nextrec_fast pooled_embedding (padded layout, one call);
- embedding_bag: one F.embedding_bag per feature on jagged (values, offsets) inputs, then cat.

forward runs under no_grad; fwd+bwd runs with dense gradients and zero_grad(set_to_none=True)
each step. Medians over interleaved repeats. The forward's achieved bandwidth (table rows read +
ids read + output written) is shown as a fraction of torch copy_ bandwidth of a 256 MiB buffer
measured in the same run.

    python benchmarks/bench_pooled_embedding.py [--batches 2048 8192] [--repeats 7] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from nextrec_fast.ops.pooled_embedding import is_available, pooled_embedding, unavailable_reason

DIM = 16
SEQ_LEN = 50


def make_features(seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocabs = [int(v) for v in np.logspace(3, 6, 26)] + [100_000] * 3
    tables = [torch.nn.Parameter(torch.randn(v, DIM, generator=gen) * 0.01) for v in vocabs]
    return tables, vocabs


def make_batch(vocabs, batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    sparse = [torch.randint(0, v, (batch,), generator=gen) for v in vocabs[:26]]
    seqs = []
    for v in vocabs[26:]:
        seq = torch.randint(1, v, (batch, SEQ_LEN), generator=gen)
        lengths = torch.randint(0, SEQ_LEN + 1, (batch, 1), generator=gen)  # ~half padding (id 0)
        seq[torch.arange(SEQ_LEN).unsqueeze(0) >= lengths] = 0
        seqs.append(seq)
    return sparse, seqs


def nextrec_style(tables, sparse, seqs):
    outs = [F.embedding(ids, tables[f]) for f, ids in enumerate(sparse)]
    for k, seq in enumerate(seqs):
        emb = F.embedding(seq, tables[26 + k])  # [B, L, D]
        mask = (seq != 0).float().unsqueeze(1)  # [B, 1, L]
        outs.append(torch.bmm(mask, emb).squeeze(1) / (mask.sum(dim=-1) + 1e-16))
    return torch.cat(outs, dim=1)


def fused(tables, sparse, seqs):
    n_sparse, n_seq = len(sparse), len(seqs)
    return pooled_embedding(
        tables, sparse + seqs,
        table_index=list(range(n_sparse + n_seq)),
        combiners=["sum"] * n_sparse + ["mean"] * n_seq,
        mask_ids=[-1] * n_sparse + [0] * n_seq,
        max_lens=[-1] * n_sparse + [SEQ_LEN] * n_seq,
        feature_names=[f"sparse_{i}" for i in range(n_sparse)] + [f"seq_{i}" for i in range(n_seq)],
        check_ids=True,
    )


def to_jagged(sparse, seqs):
    batch = sparse[0].shape[0]
    jag = [(ids, torch.arange(batch)) for ids in sparse]
    for seq in seqs:
        keep = seq != 0
        jag.append((seq[keep], torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])[:-1]))
    return jag


def embedding_bags(tables, jagged):
    outs = []
    for f, (values, offsets) in enumerate(jagged):
        outs.append(F.embedding_bag(values, tables[f], offsets, mode="sum" if f < 26 else "mean"))
    return torch.cat(outs, dim=1)


def copy_bandwidth(repeats=5):
    src = torch.empty(256 * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)  # read + write


def forward_bytes(sparse, seqs):
    batch = sparse[0].shape[0]
    rows = batch * len(sparse) + sum(int((s != 0).sum()) for s in seqs)
    ids = sum(t.numel() * t.element_size() for t in sparse + seqs)
    return rows * DIM * 4 + ids + batch * (len(sparse) + len(seqs)) * DIM * 4


def bench(batch, tables, vocabs, repeats):
    sparse, seqs = make_batch(vocabs, batch)
    jagged = to_jagged(sparse, seqs)
    impls = {
        "nextrec": lambda: nextrec_style(tables, sparse, seqs),
        "fused": lambda: fused(tables, sparse, seqs),
        "embedding_bag": lambda: embedding_bags(tables, jagged),
    }
    with torch.no_grad():
        ref = impls["nextrec"]()
        for name, fn in impls.items():
            torch.testing.assert_close(fn(), ref, rtol=1e-5, atol=1e-6, msg=f"{name} disagrees")
    grad_out = torch.randn(ref.shape)

    def fwd(fn):
        with torch.no_grad():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    def fwd_bwd(fn):
        for t in tables:
            t.grad = None  # zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn().backward(grad_out)
        return time.perf_counter() - t0

    results = {}
    for mode, step in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
        times = {name: [] for name in impls}
        for name, fn in impls.items():  # warm-up
            step(fn)
        for _ in range(repeats):
            for name, fn in impls.items():  # interleaved
                times[name].append(step(fn))
        results[mode] = {name: statistics.median(ts) for name, ts in times.items()}
    return results, forward_bytes(sparse, seqs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not is_available():
        raise SystemExit(f"pooled_embedding unavailable: {unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tables, vocabs = make_features()
    copy_bw = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, dim {DIM}, "
          f"26 sparse + 3 sequence features (max_len {SEQ_LEN}); table rows: {sum(vocabs):,}")
    print(f"copy_ bandwidth (256 MiB, read+write): {copy_bw / 1e9:.1f} GB/s\n")
    header = f"{'batch':>6} {'mode':>8} {'impl':>14} {'ms':>9} {'vs nextrec':>11} {'fwd GB/s':>9} {'of copy':>8}"
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        results, fwd_bytes = bench(batch, tables, vocabs, args.repeats)
        for mode, by_impl in results.items():
            ref = by_impl["nextrec"]
            for name, t in by_impl.items():
                bw = f"{fwd_bytes / t / 1e9:9.2f} {fwd_bytes / t / copy_bw:8.1%}" if mode == "forward" else ""
                print(f"{batch:>6} {mode:>8} {name:>14} {t * 1e3:9.2f} {ref / t:10.2f}x {bw}")
        print()


if __name__ == "__main__":
    main()
