"""Tests of nextrec_fast.ops.pooled_embedding (CPU) against nextrec 0.3.1's pooling formulas.

The reference below is written the way nextrec's EmbeddingLayer computes (embedding lookup ->
[B, L, D], mask = (ids != padding id).float(), bmm, / (count + 1e-16), flatten for concat),
evaluated in float64. Feature mixes are drawn fresh per run (the seed is printed on failure).

Tolerances: fp64 tight; fp32 ~1e-5 (different summation order); fp16/bf16 tables are compared
with the fp64 reference computed from the same half-precision values, the op accumulating in
fp32 and rounding once, so the error is about one half-precision ulp of the result
(fp16: 2^-11 relative, bf16: 2^-8).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from nextrec_fast.ops import pooled_embedding as pe

pytestmark = pytest.mark.skipif(not pe.is_available(), reason=f"extension unavailable: {pe.unavailable_reason()}")

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))


@pytest.fixture
def rng(request):
    seed = RUN_SEED + sum(map(ord, request.node.name))
    print(f"seed={seed} (NEXTREC_FAST_TEST_SEED={RUN_SEED})")
    return random.Random(seed)


# ------------------------------------------------------------------------------------------
# Reference (nextrec's formulas, plain PyTorch)
# ------------------------------------------------------------------------------------------

def to_padded(values, offsets, batch):
    """Jagged (values, offsets) -> padded [B, Lmax] ids (0-filled) and a validity mask."""
    lengths = [int(offsets[b + 1] - offsets[b]) for b in range(batch)]
    width = max(lengths + [1])
    seq = torch.zeros(batch, width, dtype=torch.int64)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for b in range(batch):
        n = lengths[b]
        seq[b, width - n:] = values[int(offsets[b]):int(offsets[b + 1])].long()  # right-aligned: keeps "last"
        valid[b, width - n:] = True
    return seq, valid


def reference(case, tables, weights=None, compute_dtype=torch.float64):
    """nextrec's EmbeddingLayer pooling for every feature, concatenated."""
    outs = []
    for f in range(len(case["ids"])):
        table = tables[case["table_index"][f]].to(compute_dtype)
        pad = case["grad_padding_idx"][case["table_index"][f]]
        ids, offsets = case["ids"][f], case["offsets"][f]
        w = None if weights is None else weights[f]
        if offsets is None:
            seq = ids.long()
            if seq.dim() == 1:
                seq = seq.unsqueeze(1)
                w = None if w is None else w.unsqueeze(1)
            valid = torch.ones_like(seq, dtype=torch.bool)
        else:
            batch = offsets.numel() - 1
            seq, valid = to_padded(ids, offsets, batch)
            if w is not None:
                w_pad = torch.zeros(seq.shape, dtype=w.dtype)
                for b in range(batch):
                    n = int(offsets[b + 1] - offsets[b])
                    if n:
                        w_pad[b, -n:] = w[int(offsets[b]):int(offsets[b + 1])]
                w = w_pad
        max_len = case["max_lens"][f]
        if max_len >= 0 and seq.size(1) > max_len:  # nextrec: seq[:, -max_len:]
            seq, valid = seq[:, -max_len:], valid[:, -max_len:]
            w = None if w is None else w[:, -max_len:]
        emb = F.embedding(seq, table, padding_idx=pad if pad >= 0 else None)  # [B, L, D]
        combiner = case["combiners"][f]
        if combiner == "concat":
            outs.append(emb.flatten(start_dim=1))
            continue
        if w is not None:
            emb = emb * w.to(compute_dtype).unsqueeze(-1)
        mask = ((seq != case["mask_ids"][f]) & valid).to(compute_dtype).unsqueeze(1)  # [B, 1, L]
        pooled = torch.bmm(mask, emb).squeeze(1)
        if combiner == "mean":
            pooled = pooled / (mask.sum(dim=-1) + 1e-16)
        outs.append(pooled)
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------------------
# Random feature mixes
# ------------------------------------------------------------------------------------------

def random_case(rng, *, batch=None, dtype=torch.float32, jagged=None, weights=False, max_seq=12, half=False):
    batch = batch if batch is not None else rng.choice([1, 2, 7, 33])
    num_tables = rng.randint(1, 4)
    dims = [rng.choice([1, 3, 4, 8, 16, 33] if not half else [4, 8, 16]) for _ in range(num_tables)]
    vocabs = [rng.randint(2, 60) for _ in range(num_tables)]
    tables = [torch.randn(v, d, dtype=torch.float64).to(dtype) for v, d in zip(vocabs, dims)]
    case = dict(ids=[], offsets=[], table_index=[], combiners=[], mask_ids=[], max_lens=[], feature_names=[],
                per_id_weights=[],
                grad_padding_idx=[rng.choice([-1, 0, rng.randrange(v)]) for v in vocabs])
    for f in range(rng.randint(1, 6)):
        t = rng.randrange(num_tables)
        vocab = vocabs[t]
        kind = rng.choice(["sparse", "sum", "mean", "concat"])
        layout_jagged = (rng.random() < 0.5 if jagged is None else jagged) and kind in ("sum", "mean")
        id_dtype = rng.choice([torch.int32, torch.int64])
        mask_id = rng.choice([-1, 0, rng.randrange(vocab)]) if kind != "sparse" else -1
        if kind == "sparse":
            ids = torch.randint(0, vocab, (batch,) if rng.random() < 0.5 else (batch, 1))
            offsets, combiner, max_len = None, "sum", rng.choice([-1, 1, 3])
        elif layout_jagged:
            lengths = [rng.choice([0, 0, 1, rng.randint(1, max_seq), rng.randint(1, max_seq)]) for _ in range(batch)]
            offsets = torch.tensor([0] + lengths).cumsum(0).to(rng.choice([torch.int32, torch.int64]))
            ids = torch.randint(0, vocab, (int(offsets[-1]),))
            if mask_id >= 0 and ids.numel():  # sprinkle padding ids
                ids[torch.rand(ids.shape) < 0.3] = mask_id
            combiner, max_len = kind, rng.choice([-1, 1, 2, 5, max_seq + 3])
        else:
            L = rng.randint(1, max_seq)
            ids = torch.randint(0, vocab, (batch, L))
            if mask_id >= 0:
                ids[torch.rand(ids.shape) < 0.4] = mask_id
                ids[0] = mask_id  # an all-padding row
            offsets, combiner = None, kind
            max_len = rng.choice([-1, 1, max(1, L - 2), L, L + 3]) if kind != "concat" else rng.choice([-1, 1, L])
        case["ids"].append(ids.to(id_dtype))
        case["offsets"].append(offsets)
        case["table_index"].append(t)
        case["combiners"].append(combiner)
        case["mask_ids"].append(mask_id)
        case["max_lens"].append(max_len)
        case["feature_names"].append(f"feat{f}_{kind}")
        w = None
        if weights and combiner in ("sum", "mean") and rng.random() < 0.7:
            w = torch.rand(ids.shape, dtype=torch.float64).to(dtype)
        case["per_id_weights"].append(w)
    return case, tables


def call(case, tables, **overrides):
    kwargs = dict(table_index=case["table_index"], combiners=case["combiners"], mask_ids=case["mask_ids"],
                  max_lens=case["max_lens"], feature_names=case["feature_names"], offsets=case["offsets"],
                  per_id_weights=case.get("per_id_weights"), grad_padding_idx=case["grad_padding_idx"])
    kwargs.update(overrides)
    return pe.pooled_embedding(tables, case["ids"], **kwargs)


def reference_grads(case, tables, grad_out, weights=None):
    ref_tables = [t.detach().to(torch.float64).requires_grad_(True) for t in tables]
    ref_weights = None
    if weights is not None:
        ref_weights = [None if w is None else w.detach().to(torch.float64).requires_grad_(True) for w in weights]
    out = reference(case, ref_tables, ref_weights)
    out.backward(grad_out.to(torch.float64))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ref_tables]
    wgrads = None if ref_weights is None else [None if w is None else w.grad for w in ref_weights]
    return out.detach(), grads, wgrads


def check_case(case, tables, dtype, weights=False):
    tol = TOL[dtype]
    params = [t.clone().requires_grad_(True) for t in tables]
    wparams = None
    if weights:
        wparams = [None if w is None else w.clone().requires_grad_(True) for w in case["per_id_weights"]]
    out = call(case, params, per_id_weights=wparams)
    assert out.dtype == dtype and not torch.isnan(out).any()
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    ref_out, ref_grads, ref_wgrads = reference_grads(case, tables, grad_out, wparams)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    out.backward(grad_out)
    for p, g in zip(params, ref_grads):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got.double(), g, **tol)
    if weights:
        for w, g in zip(wparams, ref_wgrads):
            if w is not None:  # the reference leaves weights of empty features without .grad
                expected = g if g is not None else torch.zeros(w.shape, dtype=torch.float64)
                torch.testing.assert_close(w.grad.double(), expected, **tol)


# ------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("draw", range(6))
def test_random_mixes_match_reference(rng, dtype, draw):
    half = dtype in (torch.float16, torch.bfloat16)
    case, tables = random_case(rng, dtype=dtype, half=half)
    check_case(case, tables, dtype)


@pytest.mark.parametrize("simd", ["1", "0"])
@pytest.mark.parametrize("draw", range(3))
def test_both_row_listings_match_reference(rng, monkeypatch, simd, draw):
    """The forward lists a bag's rows 8 ids at a time with AVX-512 where the CPU has it
    (NEXTREC_FAST_CPU_SIMD=0: the scalar loop): long bags (several 8-wide steps and a tail),
    several row chunks, both id dtypes."""
    monkeypatch.setenv("NEXTREC_FAST_CPU_SIMD", simd)
    case, tables = random_case(rng, dtype=torch.float64, batch=rng.choice([1, 9, 300]), max_seq=37)
    check_case(case, tables, torch.float64)


def test_row_listings_are_bit_identical(rng, monkeypatch):
    for _ in range(4):
        case, tables = random_case(rng, dtype=torch.float32, batch=300, max_seq=41)
        with torch.no_grad():
            monkeypatch.setenv("NEXTREC_FAST_CPU_SIMD", "0")
            scalar = call(case, tables).clone()
            monkeypatch.setenv("NEXTREC_FAST_CPU_SIMD", "1")
            simd = call(case, tables)
        assert torch.equal(scalar, simd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_rows_pooled_16_at_a_time_are_bit_identical(rng, monkeypatch, dtype):
    """fp16/bf16 sum/mean rows whose length is a multiple of 16 are pooled 16 values per step with
    AVX-512 where the CPU has it: bit-identical to the scalar loop on random mixes (weights too),
    and on rounding ties, overflow and NaN equal to the fp32 sum rounded by torch."""
    def both(case, tables):
        with torch.no_grad():
            monkeypatch.setenv("NEXTREC_FAST_CPU_SIMD", "0")
            scalar = call(case, tables).clone()
            monkeypatch.setenv("NEXTREC_FAST_CPU_SIMD", "1")
            simd = call(case, tables).clone()
        return scalar, simd

    for _ in range(3):
        case, tables = random_case(rng, dtype=dtype, batch=300, max_seq=30, weights=True, half=True)
        tables = [torch.randn(t.shape[0], rng.choice([16, 32, 48]), dtype=torch.float64).to(dtype) for t in tables]
        scalar, simd = both(case, tables)
        assert torch.equal(scalar.view(torch.int16), simd.view(torch.int16))

    # Ties (1 + half an ulp), a sum past the largest finite value, NaN, -0.0; dims 16 and 32.
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    big = torch.finfo(dtype).max
    values = [1.0, ulp / 2, 1.0 + ulp, big, float("nan"), -0.0]
    for dim in (16, 32):
        table = torch.tensor(values, dtype=torch.float64).unsqueeze(1).expand(-1, dim).contiguous().to(dtype)
        pairs = torch.tensor([[0, 1], [2, 1], [3, 3], [4, 0], [5, 5], [1, 0]])
        case = dict(ids=[pairs], offsets=[None], table_index=[0], combiners=["sum"], mask_ids=[-1], max_lens=[-1],
                    feature_names=["ties"], per_id_weights=[None], grad_padding_idx=[-1])
        scalar, simd = both(case, [table])
        assert torch.equal(scalar.view(torch.int16), simd.view(torch.int16))
        # Summed in position order from +0 (so -0.0 + -0.0 pools to +0.0, as the scalar loop does).
        rows = table.float()
        expected = ((torch.zeros(rows.shape[1]) + rows[pairs[:, 0]]) + rows[pairs[:, 1]]).to(dtype)
        nan = expected.isnan()
        assert torch.equal(simd.isnan(), nan)
        assert torch.equal(simd.view(torch.int16)[~nan], expected.view(torch.int16)[~nan]), (simd, expected)


def test_inference_call_skips_autograd_but_training_call_records_it():
    """Without anything to differentiate the wrapper calls the kernel below the Autograd key;
    the result must be the same, and a table that needs grad must still get a graph."""
    tables = [torch.randn(20, 4, dtype=torch.float64)]
    ids = [torch.randint(0, 20, (5, 3))]
    kwargs = dict(table_index=[0], combiners=["mean"], mask_ids=[0], max_lens=[-1], feature_names=["f"])
    plain = pe.pooled_embedding(tables, ids, **kwargs)
    assert plain.grad_fn is None and not plain.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(pe.pooled_embedding([tables[0].requires_grad_()], ids, **kwargs), plain,
                                   rtol=0, atol=0)
    trained = pe.pooled_embedding(tables, ids, **kwargs)
    assert trained.requires_grad and trained.grad_fn is not None
    torch.testing.assert_close(trained.detach(), plain, rtol=0, atol=0)
    trained.sum().backward()
    assert tables[0].grad is not None and tables[0].grad.abs().sum() > 0


@pytest.mark.parametrize("jagged", [False, True])
@pytest.mark.parametrize("draw", range(3))
def test_per_id_weights_and_their_gradients(rng, jagged, draw):
    case, tables = random_case(rng, dtype=torch.float64, jagged=jagged, weights=True)
    check_case(case, tables, torch.float64, weights=True)


def test_gradcheck_tables_and_weights():
    torch.manual_seed(0)
    tables = [torch.randn(7, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(5, 2, dtype=torch.float64, requires_grad=True)]
    ids = [torch.tensor([[1, 0, 3], [0, 0, 0], [6, 6, 2]]), torch.tensor([4, 0, 1, 1, 3]), torch.tensor([[2], [5], [0]])]
    offsets = [None, torch.tensor([0, 2, 2, 5]), None]
    weights = [torch.rand(3, 3, dtype=torch.float64, requires_grad=True),
               torch.rand(5, dtype=torch.float64, requires_grad=True), None]

    def fn(t0, t1, w0, w1):
        return pe.pooled_embedding([t0, t1], ids, table_index=[0, 1, 0], combiners=["mean", "sum", "sum"],
                                   mask_ids=[0, 0, -1], max_lens=[2, -1, -1], feature_names=["a", "b", "c"],
                                   offsets=offsets, per_id_weights=[w0, w1, None])  # padding rows: tested vs reference

    assert torch.autograd.gradcheck(fn, (*tables, *weights[:2]))


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_matches_embedding_bag(layout, combiner):
    torch.manual_seed(1)
    batch, L, dims, vocabs = 64, 9, [16, 8, 5], [100, 37, 1000]
    tables = [torch.randn(v, d) for v, d in zip(vocabs, dims)]
    ids, offsets, expected = [], [], []
    for v, table in zip(vocabs, tables):
        seq = torch.randint(0, v, (batch, L))
        seq[torch.rand(seq.shape) < 0.3] = 0
        seq[3] = 0
        if layout == "padded":
            ids.append(seq)
            offsets.append(None)
            expected.append(F.embedding_bag(seq, table, mode=combiner, padding_idx=0))
        else:
            lengths = torch.randint(0, L + 1, (batch,))
            lengths[5] = 0  # empty bag
            values = torch.cat([seq[b, :lengths[b]] for b in range(batch)])
            off = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            ids.append(values)
            offsets.append(off)
            expected.append(F.embedding_bag(values, table, off, mode=combiner, padding_idx=0, include_last_offset=True))
    out = pe.pooled_embedding(tables, ids, table_index=[0, 1, 2], combiners=[combiner] * 3, mask_ids=[0] * 3,
                              max_lens=[-1] * 3, feature_names=["x", "y", "z"], offsets=offsets)
    torch.testing.assert_close(out, torch.cat(expected, dim=1), rtol=1e-5, atol=1e-6)


def test_matches_list_of_embedding_bags_with_grads():
    torch.manual_seed(2)
    bags = [torch.nn.EmbeddingBag(50, 8, mode="sum", padding_idx=0), torch.nn.EmbeddingBag(20, 4, mode="mean")]
    tables = [b.weight.detach().clone().requires_grad_(True) for b in bags]
    values = [torch.randint(0, 50, (40,)), torch.randint(0, 20, (25,))]
    offsets = [torch.tensor([0, 10, 10, 30, 40]), torch.tensor([0, 5, 6, 20, 25])]
    expected = torch.cat([b(v, o[:-1]) for b, v, o in zip(bags, values, offsets)], dim=1)
    out = pe.pooled_embedding(tables, values, table_index=[0, 1], combiners=["sum", "mean"], mask_ids=[0, -1],
                              max_lens=[-1, -1], feature_names=["a", "b"], offsets=offsets, grad_padding_idx=[0, -1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn(out.shape)
    out.backward(g)
    expected.backward(g)
    for b, t in zip(bags, tables):
        torch.testing.assert_close(t.grad, b.weight.grad, rtol=1e-5, atol=1e-6)


def test_edge_cases_batch_one_long_bags_truncation_shared_tables(rng):
    torch.manual_seed(3)
    table = torch.randn(500, 16, dtype=torch.float64)
    other = torch.randn(30, 4, dtype=torch.float64)
    long_seq = torch.randint(0, 500, (1, 1000))
    long_seq[0, ::3] = 0
    jag_values = torch.randint(0, 30, (1200,))
    case = dict(
        ids=[long_seq, long_seq, torch.tensor([7]), jag_values, torch.zeros(1, 5, dtype=torch.int64)],
        offsets=[None, None, None, torch.tensor([0, 1200]), None],
        table_index=[0, 0, 0, 1, 1],  # table 0 shared by three features
        combiners=["mean", "sum", "sum", "mean", "mean"],
        mask_ids=[0, 0, -1, 3, 0],  # the last feature is all padding
        max_lens=[-1, 50, -1, 777, -1],
        feature_names=["long_mean", "long_trunc", "single", "jagged_long", "all_pad"],
        per_id_weights=None, grad_padding_idx=[0, -1])
    check_case(case, [table, other], torch.float64)
    out = call(case, [table, other])
    assert (out[:, -4:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_chunks_wide_rows_and_large_gradient_blocks(dtype):
    """Batches spanning several forward chunks (128 rows), row lengths on the compile-time paths
    (16, 64) and off them (37), and gradient blocks large enough (>= 1 MiB) for the streaming
    zeroing, one of them starting off a 64-byte boundary (15000 x 37 rows split into 1 MiB blocks)."""
    gen = torch.Generator().manual_seed(5)
    batch = 300
    tables = [torch.randn(v, d, generator=gen, dtype=torch.float64).to(dtype)
              for v, d in ((20000, 16), (15000, 37), (300, 64))]
    seq = torch.randint(1, 15000, (batch, 20), generator=gen)
    seq[torch.rand(seq.shape, generator=gen) < 0.5] = 0
    case = dict(
        ids=[torch.randint(0, 20000, (batch,), generator=gen), seq,
             torch.randint(0, 300, (batch, 3), generator=gen).int(), torch.randint(0, 20000, (batch, 4), generator=gen)],
        offsets=[None] * 4, table_index=[0, 1, 2, 0], combiners=["sum", "mean", "concat", "sum"],
        mask_ids=[-1, 0, -1, 7], max_lens=[-1, 15, -1, -1], feature_names=["sparse", "seq", "concat64", "sum16"],
        per_id_weights=None, grad_padding_idx=[-1, 0, -1])
    check_case(case, tables, dtype)
    # Into poisoned buffers: every element of the large blocks is written.
    out = call(case, tables)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    _, ref, _ = reference_grads(case, tables, grad_out)
    bufs = [torch.full_like(t, float("nan")) for t in tables]
    torch.ops.nextrec_fast.pooled_embedding_backward_into(
        grad_out, bufs, *_common_op_args(case, tables), case["grad_padding_idx"], [1] * len(tables), True)
    for b, r in zip(bufs, ref):
        torch.testing.assert_close(b.double(), r, **TOL[dtype])


def test_single_ids_are_copied_exactly_and_masked_positions_are_skipped():
    """A single-id row is copied bit for bit (-0.0 stays -0.0, like nn.Embedding); a masked
    position contributes nothing even when its row or its weight is inf/nan."""
    table = torch.tensor([[float("nan"), float("inf")], [-0.0, 1.5], [2.0, -0.0]])
    seq = torch.tensor([[1, 0, 2], [0, 0, 0], [2, 0, 0]])
    weights = torch.tensor([[2.0, float("nan"), 1.0], [float("inf")] * 3, [1.0, float("inf"), 0.5]])
    out = pe.pooled_embedding([table], [torch.tensor([1, 2, 1]), seq, seq], table_index=[0, 0, 0],
                              combiners=["sum", "sum", "mean"], mask_ids=[-1, 0, 0], max_lens=[-1, -1, -1],
                              feature_names=["single", "sum", "wmean"], per_id_weights=[None, None, weights])
    single = out[:, :2]
    assert torch.equal(single, table[[1, 2, 1]]) and torch.equal(torch.signbit(single), torch.signbit(table[[1, 2, 1]]))
    torch.testing.assert_close(out[:, 2:4], torch.tensor([[2.0, 1.5], [0.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(out[:, 4:], torch.tensor([[1.0, 1.5], [0.0, 0.0], [2.0, 0.0]]))


def test_concat_and_sparse_padding_row_value():
    table = torch.randn(10, 3)
    seq = torch.tensor([[1, 2, 0, 0], [0, 4, 5, 6]])
    out = pe.pooled_embedding([table], [seq, torch.tensor([0, 9])], table_index=[0, 0], combiners=["concat", "sum"],
                              mask_ids=[0, -1], max_lens=[3, -1], feature_names=["c", "s"], grad_padding_idx=[0])
    # concat: no masking, last 3 positions flattened; single id: the padding row's value IS returned
    torch.testing.assert_close(out[:, :9], table[seq[:, 1:]].flatten(1))
    torch.testing.assert_close(out[:, 9:], table[torch.tensor([0, 9])])


@pytest.mark.nextrec
def test_nextrec_embedding_layer_equivalence():
    nextrec_layers = pytest.importorskip("nextrec.basic.layers", reason="nextrec is not installed")
    from nextrec.basic.features import SequenceFeature, SparseFeature

    torch.manual_seed(4)
    feats = [SparseFeature("u", vocab_size=100, embedding_dim=8),
             SparseFeature("i", vocab_size=50, embedding_dim=8, padding_idx=0),
             SequenceFeature("hist", vocab_size=100, max_len=6, embedding_name="u", embedding_dim=8,
                             combiner="mean", padding_idx=0),
             SequenceFeature("tags", vocab_size=30, max_len=4, embedding_dim=4, combiner="sum"),
             SequenceFeature("clicks", vocab_size=30, max_len=3, embedding_name="tags", embedding_dim=4,
                             combiner="concat")]
    layer = nextrec_layers.EmbeddingLayer(feats)
    B = 16
    x = {"u": torch.randint(0, 100, (B,)), "i": torch.randint(0, 50, (B,)),
         "hist": torch.randint(0, 100, (B, 9)), "tags": torch.randint(0, 30, (B, 4)), "clicks": torch.randint(0, 30, (B, 5))}
    x["hist"][x["hist"] < 30] = 0
    x["hist"][2] = 0
    x["tags"][x["tags"] < 10] = 0
    expected = layer(x, feats, squeeze_dim=True)
    names = list(layer.embed_dict.keys())
    tables = [layer.embed_dict[n].weight.detach().clone().requires_grad_(True) for n in names]
    out = pe.pooled_embedding(
        tables, [x[f.name] for f in feats],
        table_index=[names.index(f.embedding_name) for f in feats],
        combiners=[getattr(f, "combiner", "sum") for f in feats],
        mask_ids=[-1, -1, 0, 0, 0], max_lens=[-1, -1, 6, 4, 3], feature_names=[f.name for f in feats],
        grad_padding_idx=[layer.embed_dict[n].padding_idx if layer.embed_dict[n].padding_idx is not None else -1
                          for n in names])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    g = torch.randn(out.shape)
    expected.backward(g)
    out.backward(g)
    for n, t in zip(names, tables):
        torch.testing.assert_close(t.grad, layer.embed_dict[n].weight.grad, rtol=1e-5, atol=1e-6)


def test_coalesced_gradients_do_not_depend_on_threads_or_strides(rng):
    """Tables are handed to threads largest first (pooled_embedding_backward_coalesced): which
    thread sums a table, and how many threads there are, leave every row list and sum bit-identical;
    so does a gradient whose rows are strided."""
    case, tables = random_case(rng, batch=rng.randint(64, 160), dtype=torch.float32, weights=True, max_seq=40)
    common = _common_op_args(case, tables)
    width = call(case, tables).shape[1]
    batch = len(case["ids"][0]) if case["offsets"][0] is None else len(case["offsets"][0]) - 1
    grad_out = torch.randn(batch, width)
    need = [1] * len(tables)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.nextrec_fast.pooled_embedding_backward_coalesced(
                grad_out, *common, case["grad_padding_idx"], need))
    finally:
        torch.set_num_threads(threads)
    # A row-strided gradient (the pooled block of a wider [B, pooled + dense] gradient, which the
    # CPU op reads in place) gives the same bits as a contiguous one.
    wide = torch.randn(batch, width + 5)
    wide[:, :width] = grad_out
    results.append(torch.ops.nextrec_fast.pooled_embedding_backward_coalesced(
        wide[:, :width], *common, case["grad_padding_idx"], need))
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_sparse_grad_matches_dense(rng):
    case, tables = random_case(rng, dtype=torch.float64, weights=True)
    dense = [t.clone().requires_grad_(True) for t in tables]
    sparse = [t.clone().requires_grad_(True) for t in tables]
    out_d = call(case, dense)
    out_s = call(case, sparse, sparse_grad=True)
    g = torch.randn(out_d.shape, dtype=torch.float64)
    out_d.backward(g)
    out_s.backward(g)
    for d, s in zip(dense, sparse):
        if d.grad is None:
            continue
        assert s.grad.is_sparse
        torch.testing.assert_close(s.grad.to_dense(), d.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("draw", range(3))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_coalesced_gradients_match_the_reference(rng, dtype, draw):
    """The in-backward optimisers' gradients (pooled_embedding_backward_coalesced): per table its
    distinct rows, in first-appearance order, and their summed gradients (float32 for half
    tables), judged against the float64 reference's dense gradient, with per-id weights, concat,
    jagged and padded layouts, int32 ids and shared tables; plus the per-table finite flags."""
    case, tables = random_case(rng, dtype=dtype, weights=True)
    common = _common_op_args(case, tables)
    width = call(case, tables).shape[1]
    grad_out = torch.randn(len(case["ids"][0]) if case["offsets"][0] is None else len(case["offsets"][0]) - 1, width,
                           dtype=torch.float64).to(dtype)
    need = [rng.choice([0, 1]) for _ in tables]
    need[rng.randrange(len(tables))] = 1
    flat = torch.ops.nextrec_fast.pooled_embedding_backward_coalesced(grad_out, *common, case["grad_padding_idx"], need)
    *flat, finite = flat
    assert finite.dtype == torch.bool and finite.tolist() == [True] * sum(need)
    _, expected, _ = reference_grads(case, tables, grad_out.to(torch.float64), case["per_id_weights"])
    acc_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: TOL[torch.float32],
           torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}[dtype]  # bf16 inputs, float32 sums
    for t, (rows, sums) in zip([t for t in range(len(tables)) if need[t]], zip(flat[0::2], flat[1::2])):
        assert rows.dtype == torch.int64 and sums.dtype == acc_dtype and sums.shape == (len(rows), tables[t].shape[1])
        assert len(set(rows.tolist())) == len(rows), "rows repeat"
        dense = torch.zeros(tables[t].shape, dtype=torch.float64)
        dense[rows] = sums.double()
        torch.testing.assert_close(dense, expected[t], **tol, msg=lambda m: f"table {t}: {m}")
        # Exactly the rows that some kept, pooled position of a reading feature hits.
        hit = []
        for f, ti in enumerate(case["table_index"]):
            if ti != t:
                continue
            ids = case["ids"][f].long()
            if case["offsets"][f] is not None:
                ids, valid = to_padded(ids, case["offsets"][f], grad_out.shape[0])
            else:
                ids, valid = ids.reshape(grad_out.shape[0], -1), torch.ones(ids.reshape(grad_out.shape[0], -1).shape, dtype=torch.bool)
            if case["max_lens"][f] >= 0:  # the last max_len valid positions of each bag
                keep = valid.flip(1).cumsum(1).flip(1) <= case["max_lens"][f]
                valid = valid & keep
            if case["combiners"][f] != "concat":
                valid = valid & (ids != case["mask_ids"][f])
            for row in ids[valid].tolist():
                if row != case["grad_padding_idx"][t] and row not in hit:
                    hit.append(row)
        assert rows.tolist() == hit, (t, rows.tolist(), hit)
    # NaN everywhere: every table that got rows is flagged; NaN in feature 0's first column only:
    # the tables feature 0 does not read stay finite.
    wanted = [t for t in range(len(tables)) if need[t]]
    *_, flags = torch.ops.nextrec_fast.pooled_embedding_backward_coalesced(
        torch.full_like(grad_out, float("nan")), *common, case["grad_padding_idx"], need)
    assert flags.tolist() == [flat[2 * i].numel() == 0 for i in range(len(wanted))], flags
    poisoned = grad_out.clone()
    poisoned[:, 0] = float("nan")
    *_, flags = torch.ops.nextrec_fast.pooled_embedding_backward_coalesced(poisoned, *common, case["grad_padding_idx"], need)
    for i, t in enumerate(wanted):
        if t != case["table_index"][0]:
            assert flags[i], (t, flags)


# ------------------------------------------------------------------------------------------
# Determinism, gradient buffer reuse, poisoned buffers
# ------------------------------------------------------------------------------------------

def test_deterministic_backward_is_bit_identical(rng):
    case, tables = random_case(rng, batch=33, dtype=torch.float32)
    grads = []
    for _ in range(2):
        params = [t.clone().requires_grad_(True) for t in tables]
        out = call(case, params, deterministic=True)
        out.backward(torch.ones_like(out) * 0.1 + torch.arange(out.numel()).reshape(out.shape) * 1e-3)
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.equal(a, b)


def _training_grads(case, tables, set_to_none, steps=3):
    params = [torch.nn.Parameter(t.clone()) for t in tables]
    out_grads, ptrs = [], []
    for step in range(steps):
        for p in params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        out = call(case, params)
        (out * (step + 1)).sum().backward()
        out_grads.append([None if p.grad is None else p.grad.clone() for p in params])
        ptrs.append([None if p.grad is None else p.grad.data_ptr() for p in params])
    return out_grads, ptrs


@pytest.mark.parametrize("set_to_none", [True, False])
def test_grad_buffer_reuse_gives_identical_grads(rng, set_to_none, monkeypatch):
    case, tables = random_case(rng, batch=16, dtype=torch.float64)
    case["grad_padding_idx"] = [-1] * len(tables)
    with_reuse, ptrs = _training_grads(case, tables, set_to_none)
    monkeypatch.setenv("NEXTREC_FAST_GRAD_REUSE", "0")
    without, _ = _training_grads(case, tables, set_to_none)
    for step_a, step_b in zip(with_reuse, without):
        for a, b in zip(step_a, step_b):
            assert (a is None and b is None) or torch.equal(a, b)
    if set_to_none:  # the buffer is actually reused
        for t in range(len(tables)):
            if ptrs[0][t] is not None:
                assert ptrs[0][t] == ptrs[1][t] == ptrs[2][t]
    _, ref, _ = reference_grads(case, tables, torch.full((16, call(case, tables).shape[1]), 3.0, dtype=torch.float64))
    for got, exp in zip(with_reuse[2], ref):
        if got is not None:
            torch.testing.assert_close(got, exp)


def _fresh_ids(case, tables, gen):
    """The case with new random ids of the same shapes, dtypes and tables (new rows each step)."""
    ids = [torch.randint(0, tables[t].shape[0], i.shape, generator=gen).to(i.dtype)
           for i, t in zip(case["ids"], case["table_index"])]
    return {**case, "ids": ids}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backward_into_dirty_zeroes_only_the_dirty_rows(rng, dtype):
    """dirty_rows[i] given: the buffer holds zeros outside those rows (repeats allowed), which hold
    garbage here (NaN); the result is the gradient exactly. None: a poisoned buffer is
    overwritten whole."""
    case, tables = random_case(rng, dtype=dtype, weights=True, half=dtype != torch.float64)
    out = call(case, tables)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    _, ref, _ = reference_grads(case, tables, grad_out, case["per_id_weights"])
    dirty, bufs = [], []
    for t in tables:
        if rng.random() < 0.5:
            dirty.append(None)
            bufs.append(torch.full_like(t, float("nan")))
        else:
            rows = torch.randint(0, t.shape[0], (rng.randint(0, 2 * t.shape[0]),))
            buf = torch.zeros_like(t)
            buf[rows] = float("nan")
            dirty.append(rows)
            bufs.append(buf)
    torch.ops.nextrec_fast.pooled_embedding_backward_into_dirty(
        grad_out, bufs, *_common_op_args(case, tables), case["grad_padding_idx"], [1] * len(tables), True, dirty)
    for b, r in zip(bufs, ref):
        torch.testing.assert_close(b.double(), r, **TOL[dtype])
    with pytest.raises(RuntimeError, match="dirty row .* out of range"):
        torch.ops.nextrec_fast.pooled_embedding_backward_into_dirty(
            grad_out, bufs, *_common_op_args(case, tables), case["grad_padding_idx"], [1] * len(tables), True,
            [torch.tensor([tables[0].shape[0]])] + [None] * (len(tables) - 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reused_buffers_zero_only_written_rows_and_stay_exact(rng, dtype, monkeypatch):
    """Each step pools new ids (other rows than the step before), .grad set to None in between:
    the reused buffer is zeroed only where the last step wrote, and every step's gradients equal
    fresh buffers' bit for bit. A buffer written in place in between (here scaled and shifted, as
    clipping or a user might) is zeroed whole instead."""
    case, tables = random_case(rng, batch=16, dtype=dtype)
    case["grad_padding_idx"] = [-1] * len(tables)
    seed = rng.randrange(2**31)

    def run(steps=4, meddle_at=2):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(t.clone()) for t in tables]
        grads = []
        for step in range(steps):
            for p in params:
                if step == meddle_at and p.grad is not None:
                    p.grad.mul_(0.5).add_(1.0)  # an in-place write: bumps the buffer's version
                p.grad = None
            step_case = _fresh_ids(case, tables, gen)
            (call(step_case, params) * (step + 1)).sum().backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in params])
        return grads

    acquired = []
    original = pe._grad_buffers.acquire

    def spy(table):
        buffer, dirty = original(table)
        acquired.append(dirty is not None)
        return buffer, dirty
    monkeypatch.setattr(pe._grad_buffers, "acquire", spy)
    with_reuse = run()
    monkeypatch.setenv("NEXTREC_FAST_GRAD_REUSE", "0")
    fresh = run()
    for step, (a_step, b_step) in enumerate(zip(with_reuse, fresh)):
        for a, b in zip(a_step, b_step):
            assert (a is None and b is None) or torch.equal(a, b), f"step {step} (seed {seed})"
    used = sum(g is not None for g in with_reuse[0])
    # step 0 fresh buffers, steps 1 and 3 zeroed row by row, step 2 (after the in-place write) whole
    assert acquired == [False] * used + [True] * used + [False] * used + [True] * used, acquired


def test_grad_reuse_respects_kept_grad():
    """The user keeps step 1's .grad (gradient accumulation): step 2 must add, not overwrite it."""
    table = torch.nn.Parameter(torch.randn(20, 4))
    ids = [torch.tensor([[1, 2], [3, 1]])]
    kw = dict(table_index=[0], combiners=["sum"], mask_ids=[-1], max_lens=[-1], feature_names=["f"])
    pe.pooled_embedding([table], ids, **kw).sum().backward()
    step1 = table.grad
    kept = step1.clone()
    pe.pooled_embedding([table], ids, **kw).sum().backward()
    torch.testing.assert_close(table.grad, 2 * kept)
    saved = table.grad  # also kept by a user reference while .grad is reset
    table.grad = None
    pe.pooled_embedding([table], ids, **kw).sum().backward()
    torch.testing.assert_close(saved, 2 * kept)  # untouched
    torch.testing.assert_close(table.grad, kept)
    assert table.grad.data_ptr() != saved.data_ptr()


def test_grad_cache_does_not_keep_tables_alive():
    import gc
    import weakref

    table = torch.nn.Parameter(torch.randn(10, 2))
    pe.pooled_embedding([table], [torch.tensor([1, 2])], table_index=[0], combiners=["sum"], mask_ids=[-1],
                        max_lens=[-1], feature_names=["f"]).sum().backward()
    ref, key = weakref.ref(table), id(table)
    assert key in pe._grad_buffers._written  # the rows its buffer holds
    del table
    gc.collect()
    assert ref() is None
    assert key not in pe._grad_buffers._written and key not in pe._grad_buffers._entries


def test_backward_into_overwrites_poisoned_buffers(rng):
    case, tables = random_case(rng, dtype=torch.float64, weights=True)
    out = call(case, tables)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    _, ref, _ = reference_grads(case, tables, grad_out, case["per_id_weights"])
    bufs = [torch.full_like(t, float("nan")) for t in tables]
    torch.ops.nextrec_fast.pooled_embedding_backward_into(
        grad_out, bufs, *_common_op_args(case, tables), case["grad_padding_idx"], [1] * len(tables), True)
    for b, r in zip(bufs, ref):
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

def _bad(tables, ids, exc, match, **overrides):
    n = len(ids)
    kwargs = dict(table_index=[0] * n, combiners=["sum"] * n, mask_ids=[-1] * n, max_lens=[-1] * n,
                  feature_names=[f"bad_feat{i}" for i in range(n)])
    kwargs.update(overrides)
    with pytest.raises(exc, match=match):
        pe.pooled_embedding(tables, ids, **kwargs)


def test_bad_inputs_name_the_feature():
    t = torch.randn(10, 4)
    good = torch.tensor([[1, 2], [3, 4]])
    _bad([t], [good, torch.tensor([[1.0, 2.0], [3.0, 4.0]])], TypeError, "bad_feat1.*int32 or int64")
    _bad([t], [good, torch.tensor([[1, -1], [3, 4]])], ValueError, "bad_feat1.*id -1.*out of range")
    _bad([t], [torch.tensor([[1, 10], [3, 4]])], ValueError, "bad_feat0.*id 10.*out of range")
    _bad([t], [good, torch.zeros(2, 2, 2, dtype=torch.int64)], ValueError, "bad_feat1.*\\[B\\], \\[B, 1\\] or \\[B, L\\]")
    _bad([t], [good, torch.tensor([1, 2, 3])], ValueError, "bad_feat1.*batch size 3")
    _bad([t], [good, torch.tensor([1, 2, 3])], ValueError, "bad_feat1.*non-decreasing",
         offsets=[None, torch.tensor([0, 4, 3])])
    _bad([t], [good, torch.tensor([1, 2, 3])], ValueError, "bad_feat1.*batch size 3",
         offsets=[None, torch.tensor([0, 1, 2, 3])])
    _bad([t], [good, torch.tensor([1, 2, 3])], ValueError, "bad_feat1.*end at",
         offsets=[None, torch.tensor([0, 1, 2])])
    _bad([t], [good, good], ValueError, "bad_feat1.*unknown combiner", combiners=["sum", "max"])
    _bad([t], [good, good], ValueError, "bad_feat1.*concat needs at least max_len=3",
         combiners=["sum", "concat"], max_lens=[-1, 3])
    _bad([t], [good, torch.tensor([1, 2])], ValueError, "bad_feat1.*concat.*padded",
         combiners=["sum", "concat"], offsets=[None, torch.tensor([0, 1, 2])])
    _bad([t], [good, good], ValueError, "bad_feat1.*max_len", max_lens=[-1, 0])
    _bad([t], [good, good], ValueError, "bad_feat1.*table_index", table_index=[0, 1])
    _bad([t], [good, good], ValueError, "bad_feat1.*per_id_weights.*shape",
         per_id_weights=[None, torch.ones(2, 3)])
    _bad([t, torch.randn(5, 4, dtype=torch.float64)], [good], TypeError, "one dtype")
    _bad([t], [good, good.to("meta")], ValueError, "bad_feat1.*on meta but the tables are on cpu")
    _bad([t, torch.randn(5, 4, device="meta")], [good], ValueError, "one device")
    _bad([t], [good], ValueError, "mask_ids has 2 entries", mask_ids=[0, 0])


@pytest.mark.parametrize("simd", ["1", "0"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_bad_id_inside_a_long_bag_or_a_run_of_single_ids(monkeypatch, simd, id_dtype):
    """A bad id in the middle of an 8-id step (vector listing) or of a chunk's run of single-id
    rows (one copy segment per run) is reported with its feature and row."""
    monkeypatch.setenv("NEXTREC_FAST_CPU_SIMD", simd)
    t = torch.randn(10, 4)
    seq = torch.randint(0, 10, (300, 21), dtype=id_dtype)
    single = torch.randint(0, 10, (300,), dtype=id_dtype)
    bad_seq = seq.clone()
    bad_seq[173, 11] = 10
    _bad([t], [single, bad_seq], ValueError, "bad_feat1.*id 10 in row 173.*out of range", mask_ids=[-1, 0])
    bad_single = single.clone()
    bad_single[250] = -3
    _bad([t], [bad_single, seq], ValueError, "bad_feat0.*id -3 in row 250.*out of range", mask_ids=[-1, 0])


def test_no_out_of_bounds_read_for_huge_ids():
    t = torch.randn(10, 4)
    for bad in (2**31 - 1, 2**40, -(2**40)):
        _bad([t], [torch.tensor([[1, bad]])], ValueError, "bad_feat0.*out of range")


# ------------------------------------------------------------------------------------------
# torch.library integration
# ------------------------------------------------------------------------------------------

def _common_op_args(case, tables):
    """The op arguments shared by the forward and backward ops (weights as list + feature indices)."""
    weights = case.get("per_id_weights") or [None] * len(case["ids"])
    weighted = [f for f, w in enumerate(weights) if w is not None]
    return (tables, case["ids"], case["offsets"], [weights[f] for f in weighted], weighted, case["table_index"],
            [pe.COMBINERS[c] for c in case["combiners"]], case["mask_ids"], case["max_lens"], case["feature_names"])


def _op_args(case, tables, check=True, det=False, sparse=False):
    return (*_common_op_args(case, tables), case["grad_padding_idx"], check, det, sparse)


@pytest.mark.parametrize("draw", range(2))
def test_opcheck(rng, draw):
    case, tables = random_case(rng, dtype=torch.float64, weights=True)
    tables = [t.requires_grad_(True) for t in tables]
    torch.library.opcheck(torch.ops.nextrec_fast.pooled_embedding_forward.default, _op_args(case, tables))
    out = call(case, tables)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    # The backward ops run inside the forward op's backward, on tensors that need no gradient:
    # given tables that do, opcheck backprops through them and torch warns that they have no
    # autograd kernel ("may lead to silently incorrect behavior"), alarming in a clean run.
    common = _common_op_args(case, [t.detach() for t in tables])
    need = [1] * len(tables)
    torch.library.opcheck(torch.ops.nextrec_fast.pooled_embedding_backward.default,
                          (grad_out.clone(), *common, case["grad_padding_idx"], need, True))
    torch.library.opcheck(torch.ops.nextrec_fast.pooled_embedding_backward_into.default,
                          (grad_out.clone(), [torch.empty_like(t) for t in tables], *common,
                           case["grad_padding_idx"], need, True))
    # Every row listed dirty (so repeated calls, as opcheck makes, give the same result), or none.
    torch.library.opcheck(torch.ops.nextrec_fast.pooled_embedding_backward_into_dirty.default,
                          (grad_out.clone(), [torch.empty_like(t) for t in tables], *common,
                           case["grad_padding_idx"], need, True,
                           [torch.arange(t.shape[0]) if i % 2 else None for i, t in enumerate(tables)]))
    torch.library.opcheck(torch.ops.nextrec_fast.pooled_embedding_weight_backward.default, (grad_out.clone(), *common))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(5)
    tables = [torch.nn.Parameter(torch.randn(50, 8)), torch.nn.Parameter(torch.randn(20, 4))]
    ids = [torch.randint(0, 50, (8,)), torch.randint(0, 20, (8, 5)), torch.randint(0, 50, (13,))]
    offsets = [None, None, torch.tensor([0, 1, 3, 3, 6, 8, 9, 12, 13])]

    def model(t0, t1, i0, i1, i2, o2):
        pooled = pe.pooled_embedding([t0, t1], [i0, i1, i2], table_index=[0, 1, 0], combiners=["sum", "mean", "sum"],
                                     mask_ids=[-1, 0, 0], max_lens=[-1, 3, -1], feature_names=["a", "b", "c"],
                                     offsets=[None, None, o2], grad_padding_idx=[-1, 0])
        return (pooled * 2).sum(dim=1)

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got = compiled(*tables, *ids, offsets[2])
    got.sum().backward()
    grads = [t.grad.clone() for t in tables]
    for t in tables:
        t.grad = None
    expected = model(*tables, *ids, offsets[2])
    expected.sum().backward()
    torch.testing.assert_close(got, expected)
    for g, t in zip(grads, tables):
        torch.testing.assert_close(g, t.grad)


def test_profiler_shows_op_names():
    table = torch.randn(10, 4, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pe.pooled_embedding([table], [torch.tensor([[1, 2]])], table_index=[0], combiners=["mean"], mask_ids=[0],
                            max_lens=[-1], feature_names=["f"]).sum().backward()
    names = {e.name for e in prof.events()}
    assert "nextrec_fast::pooled_embedding_forward" in names
    assert any(n.startswith("nextrec_fast::pooled_embedding_backward") for n in names)


def test_unavailable_extension_reports_reason_without_raising():
    code = ("import sys; sys.modules['nextrec_fast._C'] = None\n"
            "from nextrec_fast.ops import pooled_embedding as pe\n"
            "assert not pe.is_available()\n"
            "assert 'NEXTREC_FAST_NO_JIT' in pe.unavailable_reason(), pe.unavailable_reason()\n"
            "try:\n    pe.pooled_embedding([], [], table_index=[], combiners=[], mask_ids=[], max_lens=[], feature_names=[])\n"
            "except RuntimeError as e:\n    assert 'unavailable' in str(e)\nelse:\n    raise SystemExit('no error')\n")
    env = dict(os.environ, NEXTREC_FAST_NO_JIT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------
# CUDA (run by benchmarks/gpu_check.sh on a GPU machine; skipped here)
# ------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _case_to(case, tables, device):
    moved = {k: ([None if t is None else t.to(device) for t in v] if k in ("ids", "offsets", "per_id_weights") else v)
             for k, v in case.items()}
    return moved, [t.to(device) for t in tables]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("draw", range(4))
def test_cuda_random_mixes_match_reference(rng, dtype, draw):
    case, tables = random_case(rng, dtype=dtype, half=dtype in (torch.float16, torch.bfloat16))
    check_case(*_case_to(case, tables, "cuda"), dtype)


@cuda_only
def test_cuda_deterministic_backward_is_bit_identical(rng):
    case, tables = _case_to(*random_case(rng, batch=33), "cuda")
    grads = []
    for _ in range(2):
        params = [t.clone().requires_grad_(True) for t in tables]
        call(case, params, deterministic=True).sum().backward()
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@cuda_only
def test_cuda_out_of_range_ids_raise_naming_the_feature():
    table = torch.randn(10, 4, device="cuda")
    ids = torch.tensor([1, 2, 10], device="cuda")
    with pytest.raises(ValueError, match="bad_feature"):
        pe.pooled_embedding([table], [ids], table_index=[0], combiners=["sum"], mask_ids=[-1], max_lens=[-1],
                            feature_names=["bad_feature"])
