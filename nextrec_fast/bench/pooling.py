"""Pooling benchmark of ``nextrec-fast bench``: the multi-feature embedding pooling alone.

Implementations of nextrec 0.3.1's ``EmbeddingLayer`` pooling of every sparse and sequence
feature into one ``[B, total_dim]`` output, on the bench configuration's features:

- ``nextrec``: nextrec's formulas (lookup -> ``[B, L, D]``, padding mask, ``bmm``,
  ``/ (count + 1e-16)`` for mean, ``cat``);
- ``fused``: ``nextrec_fast.ops.pooled_embedding`` (the C++/CUDA op; padded layout, one call) on
  the tables placed as the fast models place them (large CPU tables on 2 MiB pages,
  ``nextrec_fast.huge_pages``);
- ``fused_4k_pages``: the same op on the tables as PyTorch allocates them, as the other rows use
  them (CPU with huge pages only: it shows what the placement alone is worth);
- ``fused_unchecked`` (CUDA only): the op with ``check_ids=False``, the fast path for callers
  that vouch for their ids (no device sync to report bad ids; they are still never read out of
  bounds);
- ``embedding_bag``: one ``F.embedding_bag`` per feature on jagged ``(values, offsets)`` inputs
  (padding dropped beforehand, not timed), then ``cat``.

``forward`` runs under ``no_grad``; ``forward_backward`` backpropagates a fixed ``grad_out``
into dense table gradients, with ``zero_grad(set_to_none=True)`` before each step. Repeats
alternate the implementations, medians are reported; each sample times an implementation in its
steady state: ``BURST`` consecutive calls after ``SETTLE_MS`` of untimed ones, the
implementations in a fresh random order each round (see ``time_interleaved``). The forward's achieved bandwidth (table rows
read + ids read + output written) is given as a fraction of the ``copy_`` bandwidth of a 256 MiB
buffer measured in the same run.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from nextrec_fast import huge_pages
from nextrec_fast.bench.common import CONFIGS, default_features, make_batch, spread, sync, time_interleaved

IMPLS = ("nextrec", "fused", "fused_4k_pages", "fused_unchecked", "embedding_bag")
MODES = ("forward", "forward_backward")
DEFAULT_BATCHES = (2048, 8192)
# Calls per sample (see time_interleaved): each implementation timed in its steady state.
BURST = {"forward": 5, "forward_backward": 2}
# Untimed calls of the same implementation before its timed burst: the previous implementation's
# after-effects (slow memory-bound work for a few ms after heavy compute here) fade first.
SETTLE_MS = 5.0


def make_tables(sparse, sequence, device, seed: int = 0):
    """One fp32 table (a leaf Parameter) per sparse feature, then per sequence feature."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(f.vocab_size, f.embedding_dim, generator=gen) * 0.01).to(device))
            for f in list(sparse) + list(sequence)]


def make_ids(sparse, sequence, batch: int, device, seed: int = 1):
    x, _ = make_batch([], sparse, sequence, batch=batch, device=device, seed=seed)
    return [x[f.name] for f in sparse], [x[f.name] for f in sequence]


def nextrec_pooling(tables, sparse, sequence, sparse_ids, seq_ids):
    """nextrec 0.3.1's EmbeddingLayer pooling, written out (what the ``nextrec`` rows time)."""
    outs = [F.embedding(ids, tables[i]) for i, ids in enumerate(sparse_ids)]
    for k, (f, seq) in enumerate(zip(sequence, seq_ids)):
        seq = seq[:, -f.max_len:]
        emb = F.embedding(seq, tables[len(sparse) + k])  # [B, L, D]
        pad = -1 if f.padding_idx is None else f.padding_idx
        mask = (seq != pad).to(emb.dtype).unsqueeze(1)  # [B, 1, L]
        pooled = torch.bmm(mask, emb).squeeze(1)
        if f.combiner == "mean":
            pooled = pooled / (mask.sum(dim=-1) + 1e-16)
        outs.append(pooled)
    return torch.cat(outs, dim=1)


def fused_pooling(tables, sparse, sequence, sparse_ids, seq_ids, check_ids: bool = True):
    from nextrec_fast.ops.pooled_embedding import pooled_embedding
    n_sparse = len(sparse)
    return pooled_embedding(
        tables, list(sparse_ids) + list(seq_ids),
        table_index=list(range(len(tables))),
        combiners=["sum"] * n_sparse + [f.combiner for f in sequence],
        mask_ids=[-1] * n_sparse + [-1 if f.padding_idx is None else f.padding_idx for f in sequence],
        max_lens=[-1] * n_sparse + [f.max_len for f in sequence],
        feature_names=[f.name for f in list(sparse) + list(sequence)],
        check_ids=check_ids,
    )


def to_jagged(sequence, sparse_ids, seq_ids):
    """(values, offsets) per feature for F.embedding_bag: padding (and truncated positions) dropped."""
    batch = sparse_ids[0].shape[0] if sparse_ids else seq_ids[0].shape[0]
    device = (sparse_ids or seq_ids)[0].device
    jagged = [(ids, torch.arange(batch, device=device)) for ids in sparse_ids]
    for f, seq in zip(sequence, seq_ids):
        seq = seq[:, -f.max_len:]
        keep = seq != (-1 if f.padding_idx is None else f.padding_idx)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), keep.sum(1).cumsum(0)])[:-1]
        jagged.append((seq[keep], offsets))
    return jagged


def embedding_bag_pooling(tables, sparse, sequence, jagged):
    modes = ["sum"] * len(sparse) + [f.combiner for f in sequence]
    return torch.cat([F.embedding_bag(values, tables[i], offsets, mode=modes[i])
                      for i, (values, offsets) in enumerate(jagged)], dim=1)


def copy_bandwidth(device, repeats: int = 5, mib: int = 256) -> float:
    """Bytes per second of ``dst.copy_(src)`` on a ``mib`` MiB fp32 buffer (read + write)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def forward_bytes(tables, sequence, sparse_ids, seq_ids) -> int:
    """Bytes the forward must move at least: pooled table rows, the ids, the output."""
    dims = [t.shape[1] for t in tables]
    elem = tables[0].element_size()
    n_sparse = len(sparse_ids)
    rows = sum(ids.numel() * dims[i] for i, ids in enumerate(sparse_ids))
    for k, (f, seq) in enumerate(zip(sequence, seq_ids)):
        kept = seq[:, -f.max_len:]
        rows += int((kept != (-1 if f.padding_idx is None else f.padding_idx)).sum()) * dims[n_sparse + k]
    ids = sum(t.numel() * t.element_size() for t in list(sparse_ids) + list(seq_ids))
    batch = (sparse_ids or seq_ids)[0].shape[0]
    return rows * elem + ids + batch * sum(dims) * elem


def run(batches=DEFAULT_BATCHES, device=None, repeats: int = 5, warmup: int = 2, progress=None,
        config: str = "default", check: bool = True) -> dict:
    """Times every implementation and mode per batch size. ``progress(msg)`` is called per step."""
    from nextrec_fast.ops.pooled_embedding import is_available, unavailable_reason
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, sparse, sequence = default_features(**CONFIGS[config])
    tables = make_tables(sparse, sequence, device)
    placed = [torch.nn.Parameter(huge_pages.placed_copy(t.detach())) for t in tables]
    any_placed = any(huge_pages.is_placed(t) for t in placed)
    impls = [i for i in IMPLS if (is_available() or not i.startswith("fused"))
             and (any_placed or i != "fused_4k_pages")
             and (device.type == "cuda" or i != "fused_unchecked")]  # CPU ids are always checked
    copy_bw = copy_bandwidth(device)
    rows = []
    for batch in batches:
        sparse_ids, seq_ids = make_ids(sparse, sequence, batch, device)
        jagged = to_jagged(sequence, sparse_ids, seq_ids)
        fns = {
            "nextrec": lambda: nextrec_pooling(tables, sparse, sequence, sparse_ids, seq_ids),
            "fused": lambda: fused_pooling(placed, sparse, sequence, sparse_ids, seq_ids),
            "fused_4k_pages": lambda: fused_pooling(tables, sparse, sequence, sparse_ids, seq_ids),
            "fused_unchecked": lambda: fused_pooling(placed, sparse, sequence, sparse_ids, seq_ids, check_ids=False),
            "embedding_bag": lambda: embedding_bag_pooling(tables, sparse, sequence, jagged),
        }
        fns = {name: fns[name] for name in impls}
        with torch.no_grad():
            ref = fns["nextrec"]()
            if check:
                for name, fn in fns.items():
                    torch.testing.assert_close(fn(), ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(device)
        fwd_bytes = forward_bytes(tables, sequence, sparse_ids, seq_ids)
        del ref

        def forward(fn):
            with torch.no_grad():
                fn()

        def forward_backward(fn):
            for t in tables + placed:
                t.grad = None  # zero_grad(set_to_none=True)
            fn().backward(grad_out)

        for mode, step in (("forward", forward), ("forward_backward", forward_backward)):
            if progress:
                progress(f"pooling {mode} (batch {batch}) ...")
            samples = time_interleaved(fns, device, warmup, repeats, step=step, burst=BURST[mode],
                                       settle_ms=SETTLE_MS, shuffle_seed=batch)
            ms = {name: statistics.median(s) for name, s in samples.items()}
            for name in fns:
                row = {"batch": batch, "mode": mode, "impl": name, "ms": ms[name],
                       "speedup_vs_nextrec": ms["nextrec"] / ms[name],
                       "speedup_vs_embedding_bag": ms["embedding_bag"] / ms[name],
                       "samples_ms": [round(s, 3) for s in samples[name]]}
                if mode == "forward":
                    bw = fwd_bytes / (ms[name] * 1e-3)
                    row.update(forward_gbps=bw / 1e9, fraction_of_copy=bw / copy_bw)
                rows.append(row)
        for t in tables + placed:
            t.grad = None
    return {
        "features": {"sparse": len(sparse), "sequence": len(sequence), "table_rows": sum(t.shape[0] for t in tables),
                     "dim": sorted({t.shape[1] for t in tables}), "dtype": "float32"},
        "copy_bandwidth_gbps": copy_bw / 1e9,
        "huge_pages": any_placed,
        "calls_per_sample": dict(BURST),
        "settle_ms": SETTLE_MS,
        "fused_available": is_available(),
        "fused_unavailable_reason": None if is_available() else unavailable_reason(),
        "rows": rows,
    }


def format_table(pooling: dict) -> str:
    feats = pooling["features"]
    lines = [f"pooling of {feats['sparse']} sparse + {feats['sequence']} sequence features "
             f"({feats['table_rows']:,} table rows, {feats['dtype']}); copy_ bandwidth "
             f"{pooling['copy_bandwidth_gbps']:.1f} GB/s"
             + ("" if pooling["fused_available"] else f"; fused op unavailable: {pooling['fused_unavailable_reason']}"),
             "steady state: a sample is the mean of "
             + ", ".join(f"{n} {m} calls" for m, n in pooling.get("calls_per_sample", {}).items())
             + (f" after {pooling['settle_ms']:g} ms of untimed ones; implementations in a random order each round"
                if "settle_ms" in pooling else " after an untimed one; implementations alternate between samples"),
             "legend: nextrec = nextrec's pooling formulas re-implemented (lookup to [B, L, D], mask, bmm); "
             "fused = our one-call op on tables on 2 MiB pages; fused_4k_pages = the op on tables on ordinary "
             "4 KiB pages; embedding_bag = one F.embedding_bag per feature; ms = median (min-max beside it); "
             "vs nextrec / vs emb_bag = that row's time / this row's; fwd GB/s = bytes the forward must move "
             "(rows, ids, output) per second; of copy = that as a share of a 256 MiB copy_ in the same run",
             f"{'batch':>6} {'mode':<17} {'impl':<15} {'ms':>9} {'min-max':>15} {'vs nextrec':>11} {'vs emb_bag':>11} "
             f"{'fwd GB/s':>9} {'of copy':>8}"]
    for r in pooling["rows"]:
        bw = f"{r['forward_gbps']:>9.2f} {r['fraction_of_copy']:>8.1%}" if "forward_gbps" in r else ""
        low, high = spread(r.get("samples_ms") or [r["ms"]])
        lo_hi = f"{low:.2f}-{high:.2f}"
        lines.append(f"{r['batch']:>6} {r['mode']:<17} {r['impl']:<15} {r['ms']:>9.2f} {lo_hi:>15} "
                     f"{r['speedup_vs_nextrec']:>10.2f}x {r['speedup_vs_embedding_bag']:>10.2f}x {bw}".rstrip())
    return "\n".join(lines)
