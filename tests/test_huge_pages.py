"""nextrec_fast.huge_pages: large CPU tables and their gradient buffers on 2 MiB pages.

The placement must change nothing but where the bytes live: same values, same Parameter
objects, same gradients (against the float64 reference), and the mappings are released with
their tensors. Whether the kernel really backs a mapping with huge pages depends on the machine
(THP setting, free 2 MiB frames), so the tests check what we control: alignment, exact storage
size, and that the mapping carries the MADV_HUGEPAGE advice ("hg" in /proc/self/smaps).
"""
from __future__ import annotations

import random

import pytest
import torch

from nextrec_fast import huge_pages
from nextrec_fast.ops import pooled_embedding as pe
from test_model_parity import build_pair

needs_thp = pytest.mark.skipif(not huge_pages.enabled(), reason="no transparent huge pages on this machine")


@pytest.fixture
def tiny_min(monkeypatch):
    """Place tensors of any size, so that the tests stay small."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)


def _mapping_of(ptr: int) -> dict | None:
    """The /proc/self/smaps entry (its header fields and VmFlags) of the mapping holding ptr."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                entry = {"range": (lo, hi)} if lo <= ptr < hi else None
            elif entry is not None and line.startswith("VmFlags:"):
                entry["flags"] = line.split()[1:]
                return entry
    return None


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_empty_is_aligned_exact_and_advised(tiny_min, dtype):
    shape = (1000, 7)
    t = huge_pages.empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0 and huge_pages.is_placed(t)
    assert t.untyped_storage().nbytes() == 7000 * t.element_size()  # no slack visible to torch
    src = torch.randn(shape, dtype=torch.float64).to(dtype)
    t.copy_(src)
    assert torch.equal(t, src)
    mapping = _mapping_of(t.data_ptr())
    assert mapping is not None and "hg" in mapping["flags"], mapping


@needs_thp
def test_mapping_is_released_with_the_tensor(tiny_min):
    t = huge_pages.empty((4096, 16))
    t.fill_(1.0)
    view = t[10:20]
    ptr = t.data_ptr()
    del t
    assert _mapping_of(ptr) is not None  # a view keeps it
    assert view.sum().item() == 160
    del view
    assert _mapping_of(ptr) is None


def test_small_tensors_and_switch_off_fall_back(monkeypatch):
    small = huge_pages.empty((10, 3))
    assert small.shape == (10, 3) and not huge_pages.is_placed(small)
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    monkeypatch.setenv("NEXTREC_FAST_HUGE_PAGES", "0")
    assert not huge_pages.enabled()
    p = torch.nn.Parameter(torch.randn(100, 4))
    assert huge_pages.place_parameters([p]) == 0 and not huge_pages.is_placed(p)
    assert not huge_pages.eligible((10**6, 64), torch.float32, "meta")


@needs_thp
def test_place_parameters_keeps_objects_values_and_optimizer(tiny_min):
    params = [torch.nn.Parameter(torch.randn(300, 5, dtype=dtype)) for dtype in (torch.float32, torch.float64)]
    opt = torch.optim.Adam(params, lr=0.1)
    sum(p.float().square().sum() for p in params).backward()
    opt.step()  # optimizer state exists before the move
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    assert huge_pages.place_parameters(params) == 2
    assert huge_pages.place_parameters(params) == 0  # already placed
    assert [id(p) for p in params] == ids and all(huge_pages.is_placed(p) for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    ptrs = [p.data_ptr() for p in params]
    opt.zero_grad()
    sum(p.float().square().sum() for p in params).backward()
    opt.step()
    assert [p.data_ptr() for p in params] == ptrs  # updated in place, on the placed storage
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@needs_thp
@pytest.mark.skipif(not pe.is_available(), reason="extension unavailable")
@pytest.mark.parametrize("set_to_none", [True, False])
def test_pooling_grads_on_placed_tables_and_buffers(tiny_min, set_to_none):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    tables = [torch.nn.Parameter(torch.randn(500, 8, dtype=torch.float64, generator=gen)) for _ in range(2)]
    huge_pages.place_parameters(tables)
    ids = [torch.randint(0, 500, (32,), generator=gen), torch.randint(0, 500, (32, 6), generator=gen)]
    kw = dict(table_index=[0, 1], combiners=["sum", "mean"], mask_ids=[-1, 0], max_lens=[-1, 4],
              feature_names=["a", "b"])
    grad_ptrs = []
    for step in range(3):
        if set_to_none:
            for t in tables:
                t.grad = None
        elif tables[0].grad is not None:
            for t in tables:
                t.grad.zero_()
        out = pe.pooled_embedding(tables, ids, **kw)
        g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
        out.backward(g)
        # Reference: nextrec's formulas on plain tensors, float64.
        ref_tables = [t.detach().clone().requires_grad_() for t in tables]
        seq = ids[1][:, -4:]
        mask = (seq != 0).to(torch.float64).unsqueeze(1)
        pooled = torch.bmm(mask, ref_tables[1][seq]).squeeze(1) / (mask.sum(-1) + 1e-16)
        ref = torch.cat([ref_tables[0][ids[0]], pooled], dim=1)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        ref.backward(g)
        for t, r in zip(tables, ref_tables):
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-12, atol=1e-12)
        grad_ptrs.append([t.grad.data_ptr() for t in tables])
    if set_to_none:  # one reused buffer per table, on huge pages
        assert grad_ptrs[0] == grad_ptrs[1] == grad_ptrs[2]
        assert all(huge_pages.is_placed(t.grad) for t in tables)


@needs_thp
@pytest.mark.parametrize("model", ["mmoe", "ple"])
def test_fast_model_places_tables_and_matches_reference(tiny_min, model):
    ref, fast, x = build_pair(model, random.randrange(2**31))  # float64: .to() made plain copies
    tables = fast.embedding.tables()
    assert not any(huge_pages.is_placed(t) for t in tables)
    assert fast.embedding.place_tables_on_huge_pages() == len(tables)
    assert all(huge_pages.is_placed(t) for t in tables)
    ref.train()
    fast.train()
    for _ in range(2):
        for m in (ref, fast):
            m.zero_grad(set_to_none=True)
        out_ref, out_fast = ref(x), fast(x)
        torch.testing.assert_close(out_fast, out_ref, rtol=1e-9, atol=1e-10)
        w = torch.linspace(0.5, 1.5, out_ref.numel(), dtype=out_ref.dtype).view_as(out_ref)
        (out_ref * w).sum().backward()
        (out_fast * w).sum().backward()
        for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
            if p_ref.grad is not None:
                torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


@needs_thp
def test_constructed_fast_model_has_placed_tables(tiny_min):
    from model_factory import random_features

    from nextrec_fast.models import standalone

    dense, sparse, sequence = random_features(random.Random(0))
    model = standalone.MMOE(dense, sparse, sequence, expert_params={"dims": [8]}, num_experts=2,
                            tower_params_list=[{"dims": [4]}, {"dims": [4]}], target=["a", "b"],
                            task=["binary", "binary"])
    assert all(huge_pages.is_placed(t) for t in model.embedding.tables())
