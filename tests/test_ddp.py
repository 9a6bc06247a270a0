"""DistributedDataParallel (gloo, 2 CPU processes): the fast models' gradients after DDP's
all-reduce equal the reference's, for the C++ ops (pooling, batch_norm_act) and their
gradient-buffer reuse."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_factory import random_features, random_inputs, random_model_kwargs
from test_model_parity import MODELS, perturb_batchnorm

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, model: str, out_path: str) -> None:
    import random

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        rng = random.Random(11)
        dense, sparse, sequence = random_features(rng)
        kwargs = random_model_kwargs(model, rng)
        ref_cls, fast_cls = MODELS[model]
        torch.manual_seed(0)
        ref = ref_cls(dense_features=dense, sparse_features=sparse, sequence_features=sequence, **kwargs).double()
        perturb_batchnorm(ref)
        fast = fast_cls(dense_features=dense, sparse_features=sparse, sequence_features=sequence, **kwargs).double()
        fast.load_state_dict(ref.state_dict(), strict=True)
        # Each rank its own shard of the batch.
        x = random_inputs(dense, sparse, sequence, batch=12, generator=torch.Generator().manual_seed(100 + rank),
                          dtype=torch.float64)
        grads = {}
        for name, m in (("ref", ref), ("fast", fast)):
            ddp = torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=True)
            for step in range(2):  # the second step reuses the fast path's gradient buffers
                ddp.zero_grad(set_to_none=True)
                out = ddp(x)
                (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            grads[name] = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
        if rank == 0:
            torch.save(grads, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model", list(MODELS))
def test_ddp_gradients_match_reference(model, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), model, out_path), nprocs=WORLD, join=True)
    grads = torch.load(out_path)
    scale = max(g.abs().max().item() for g in grads["ref"].values() if g is not None)
    for name, g_ref in grads["ref"].items():
        g_fast = grads["fast"][name]
        if g_ref is None:
            assert g_fast is None or not g_fast.any(), name
            continue
        assert g_fast is not None, f"{name}: no gradient"
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-11 * scale, msg=lambda m: f"{name}: {m}")
