"""Pooled embedding of all sparse + sequence features: nextrec's EmbeddingLayer (lookup to
[B, L, D], mask, bmm, cat) vs ``FastEmbeddingLayer.pool`` (the C++ op when built) vs one
``F.embedding_bag`` per feature (what PyTorch alone offers)."""
import pytest
import torch
import torch.nn.functional as F

from nextrec_fast import reference
from nextrec_fast.models.standalone import FastEmbeddingLayer

IMPLS = ("reference", "compiled_reference", "fast", "embedding_bag")
MODES = ("forward", "forward_backward")


def embedding_bag_per_feature(layer: reference.EmbeddingLayer, features, x):
    """One F.embedding_bag per feature; sparse ids are bags of one."""
    pooled = []
    for f in features:
        table = layer.embed_dict[f.embedding_name]
        ids = x[f.name].long()
        ids = ids.view(-1, 1) if ids.dim() == 1 else ids
        combiner = getattr(f, "combiner", "sum")
        pooled.append(F.embedding_bag(ids, table.weight, mode=combiner, padding_idx=table.padding_idx))
    return torch.cat(pooled, dim=1)


@pytest.fixture
def layers(features_and_batch):
    (_, sparse, sequence), x, _ = features_and_batch
    features = sparse + sequence
    torch.manual_seed(0)
    ref = reference.EmbeddingLayer(features).to(next(iter(x.values())).device)
    fast = FastEmbeddingLayer(features).to(next(iter(x.values())).device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast, features, x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_embedding(run_case, compile_or_skip, layers, impl, mode):
    ref, fast, features, x = layers
    if impl == "fast":
        pool = lambda: fast.pool(x)
        module = fast
    elif impl == "embedding_bag":
        pool = lambda: embedding_bag_per_feature(fast, features, x)
        module = fast
    else:
        forward = compile_or_skip(ref) if impl == "compiled_reference" else ref
        pool = lambda: forward(x, features, squeeze_dim=True)
        module = ref
    with torch.no_grad():
        torch.testing.assert_close(pool(), ref(x, features, squeeze_dim=True), rtol=1e-5, atol=1e-6)

    if mode == "forward":
        def step():
            with torch.no_grad():
                pool()
    else:
        def step():
            module.zero_grad(set_to_none=True)
            pool().sum().backward()
    run_case(step, group=f"embedding:{mode}", impl=impl, features=len(features))
