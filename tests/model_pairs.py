"""A fast model beside the per-module model it must behave like, with the same weights.

Three flavours, so every nn.Module-contract test runs on all the things users get:
- ``standalone``: ``nextrec_fast.models.standalone`` (plain nn.Module) beside ``reference``
  (nextrec 0.3.1's computation, module for module);
- ``standalone_v06``: ``nextrec_fast.models.standalone_v06`` beside ``reference.v06`` (nextrec
  0.6's API and computation; no nextrec needed);
- ``accelerated``: the installed nextrec's own class after ``nextrec_fast.accelerate`` beside a
  deep copy left alone (skipped without nextrec).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import random

import pytest
import torch

import nextrec_fast
from nextrec_fast.layers import experts as experts_layer
from model_factory import random_features, random_inputs, random_model_kwargs
from nextrec_generation import GENERATION, nextrec_float64, random_v06_inputs, random_v06_model
from test_model_parity import build_pair, perturb_batchnorm

# The accelerated flavour is marked `nextrec`, so the 0.6 CI environment (pytest -m nextrec) runs it.
FLAVOURS = ["standalone", "standalone_v06", pytest.param("accelerated", marks=pytest.mark.nextrec)]
KINDS = ["esmm", "mmoe", "ple"]


def nextrec_model(kind: str, seed: int, cls: type | None = None):
    """A random plain nextrec model of the installed generation and an input batch for it
    (``cls``: another class taking nextrec's arguments, e.g. a drop-in)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    if GENERATION == "0.3":
        from nextrec.basic import features as nr_features
        from nextrec.models.multi_task.esmm import ESMM
        from nextrec.models.multi_task.mmoe import MMOE
        from nextrec.models.multi_task.ple import PLE
        feats = random_features(rng, nr_features)
        kwargs = random_model_kwargs(kind, rng)
        torch.manual_seed(seed)
        model = (cls or {"esmm": ESMM, "mmoe": MMOE, "ple": PLE}[kind])(*feats, **kwargs)
        return model, random_inputs(*feats, batch=rng.randint(3, 9), generator=gen)
    if GENERATION == "0.6":
        model, feats = random_v06_model(kind, seed, norm_type=rng.choice(["batch_norm", "layer_norm", "none"]),
                                        classes={kind: cls} if cls is not None else None)
        return model, random_v06_inputs(feats, batch=rng.randint(3, 9), generator=gen)
    pytest.skip("nextrec is not installed (CI installs 0.3.1 and 0.6.14: see .ci/run)")


def model_pair(flavour: str, kind: str, seed: int):
    """(plain, fast, x) in float64 (so the comparison sees differences in what is computed, not
    float32 rounding), train mode, non-trivial BatchNorm statistics."""
    print(f"{flavour} {kind} seed={seed}")
    if flavour == "standalone":
        plain, fast, x = build_pair(kind, seed, dtype=torch.float64)
    elif flavour == "standalone_v06":
        plain_ctor, fast_ctor, inputs = constructors(flavour, kind, seed)
        plain = plain_ctor().double()
        perturb_batchnorm(plain)
        fast = fast_ctor().double()
        fast.load_state_dict(plain.state_dict(), strict=True)
        x = {k: v.double() if v.is_floating_point() else v for k, v in inputs(plain).items()}
    else:
        plain, x = nextrec_model(kind, seed)
        plain.double()
        perturb_batchnorm(plain)
        fast = nextrec_fast.accelerate(copy.deepcopy(plain))
        x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    plain.train()
    fast.train()
    return plain, fast, x


def output_of(model, x) -> torch.Tensor:
    """The forward's output ([B, T]) as a tensor (nextrec's hard-coded ``.float()`` kept float64
    in a float64 model)."""
    double = next(model.parameters()).dtype == torch.float64
    with nextrec_float64() if double else contextlib.nullcontext():
        out = model(x)
    return torch.cat(out, dim=1) if isinstance(out, (list, tuple)) else out


def weighted_sum(out: torch.Tensor) -> torch.Tensor:
    """A fixed weighted sum of the outputs (each output gets a gradient of its own)."""
    return (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum()


def forward_backward(model, x):
    """(output, {name: grad}) after one backward of a fixed weighted sum of the outputs."""
    model.zero_grad(set_to_none=True)
    out = output_of(model, x)
    weighted_sum(out).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_results(fast_result, plain_result, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    """Outputs and every gradient (for gradients ``atol`` is relative to the largest gradient)."""
    (out_fast, g_fast), (out_plain, g_plain) = fast_result, plain_result
    torch.testing.assert_close(out_fast, out_plain, rtol=rtol, atol=atol)
    scale = max((g.abs().max().item() for g in g_plain.values() if g is not None), default=1.0)
    assert g_fast.keys() == g_plain.keys()
    for name, g in g_plain.items():
        if g is None:
            assert g_fast[name] is None or not g_fast[name].any(), name
        else:
            assert g_fast[name] is not None, f"{name}: no gradient"
            torch.testing.assert_close(g_fast[name], g, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def example_parts(model, kind: str) -> list[str]:
    """Names of the submodules users hook (gate, expert, tower, level, embedding table)."""
    table = "embedding.embed_dict." + next(iter(model.embedding.embed_dict.keys()))
    if kind == "esmm":
        return ["ctr_tower", table]  # the cvr tower stays batched
    if kind == "mmoe":
        return ["gates.0", f"experts.{min(1, len(model.experts) - 1)}", f"towers.{len(model.towers) - 1}", table]
    last = len(model.cgc_layers) - 1
    return ["cgc_layers.0.task_gates.0", f"cgc_layers.{last}.shared_experts.0", f"cgc_layers.{last}.shared_gate",
            f"towers.{len(model.towers) - 1}", table]


@contextlib.contextmanager
def count_batched_banks():
    """Counts ExpertBank runs: > 0 when the batched path ran (and was not all module calls)."""
    counts = collections.Counter()
    original = experts_layer.ExpertBank.forward

    def counting(self, *args, **kwargs):
        counts["banks"] += 1
        return original(self, *args, **kwargs)

    experts_layer.ExpertBank.forward = counting
    experts_layer.ExpertBank.__call__ = counting
    try:
        yield counts
    finally:
        experts_layer.ExpertBank.forward = original
        experts_layer.ExpertBank.__call__ = original


def set_regularization(model, l1: float = 1e-3, l2: float = 1e-2) -> None:
    """Turn on nextrec's embedding and dense L1/L2 terms (0.3 keeps them as ``_embedding_l1_reg``...)."""
    for name in ("embedding_l1_reg", "dense_l1_reg", "embedding_l2_reg", "dense_l2_reg"):
        attr = name if hasattr(model, name) else "_" + name
        assert hasattr(model, attr), f"this nextrec has no {name}"
        setattr(model, attr, l1 if "l1" in name else l2)


def constructors(flavour: str, kind: str, seed: int, batch: int = 4):
    """(plain_ctor, fast_ctor, inputs): zero-argument constructors of the per-module model and
    of the fast one for one random configuration, to call inside a device or dtype context, and a
    function giving an input batch of ``batch`` rows for a model."""
    rng = random.Random(seed)
    if flavour == "standalone_v06":
        from nextrec_fast.features import v06 as features_v06
        from nextrec_fast.models import standalone_v06
        from nextrec_fast.reference import v06 as reference_v06
        norm_type = rng.choice(["batch_norm", "layer_norm", "none"])
        holder = {}

        def build_v06(cls):
            model, holder["feats"] = random_v06_model(kind, seed, norm_type=norm_type, classes={kind: cls},
                                                      feature_module=features_v06)
            return model
        return (lambda: build_v06(getattr(reference_v06, kind.upper())),
                lambda: build_v06(getattr(standalone_v06, kind.upper())),
                lambda model: random_v06_inputs(holder["feats"], batch=batch, generator=torch.Generator().manual_seed(seed)))
    if flavour == "standalone":
        from nextrec_fast import reference
        from nextrec_fast.models import standalone
        feats = random_features(rng)
        kwargs = random_model_kwargs(kind, rng)
        plain_cls, fast_cls = getattr(reference, kind.upper()), getattr(standalone, kind.upper())
        return (lambda: plain_cls(*feats, **kwargs), lambda: fast_cls(*feats, **kwargs),
                lambda model: random_inputs(*feats, batch=batch, generator=torch.Generator().manual_seed(seed)))
    if GENERATION is None:
        pytest.skip("nextrec is not installed (CI installs 0.3.1 and 0.6.14: see .ci/run)")
    if GENERATION == "0.3":
        from nextrec.basic import features as nr_features
        feats = random_features(rng, nr_features)
        kwargs = random_model_kwargs(kind, rng)
        cls = getattr(__import__(f"nextrec.models.multi_task.{kind}", fromlist=["x"]), kind.upper())
        return (lambda: cls(*feats, **kwargs), lambda: nextrec_fast.accelerate(cls(*feats, **kwargs)),
                lambda model: random_inputs(*feats, batch=batch, generator=torch.Generator().manual_seed(seed)))
    holder = {}

    def build(accelerated: bool):
        model, holder["feats"] = random_v06_model(kind, seed)
        return nextrec_fast.accelerate(model) if accelerated else model

    def inputs(model):
        return random_v06_inputs(holder["feats"], batch=batch, generator=torch.Generator().manual_seed(seed))
    return lambda: build(False), lambda: build(True), inputs
