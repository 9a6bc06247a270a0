"""Fast models against the reference implementation (the nextrec oracle), random configs per run."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nextrec_fast
from nextrec_fast.models import standalone
from nextrec_fast import reference
from model_factory import random_features, random_inputs, random_model_kwargs
from nextrec_generation import assert_as_accurate, flip_rows, moved_by_one_ulp, skip_if_rows_collapse

MODELS = {"esmm": (reference.ESMM, standalone.ESMM), "mmoe": (reference.MMOE, standalone.MMOE),
          "ple": (reference.PLE, standalone.PLE)}
SEEDS = [random.randrange(2**31) for _ in range(6)]  # fresh configs each run; the seed is in the test id


def build_pair(model: str, seed: int, dtype=torch.float64, batch: int | None = None, activation: str | None = None):
    """Reference and fast model (same weights, reference BatchNorm statistics perturbed) and a
    batch; ``activation``: every expert and tower MLP's, in place of the drawn one."""
    rng = random.Random(seed)
    dense, sparse, sequence = random_features(rng)
    kwargs = random_model_kwargs(model, rng)
    if activation is not None:
        for key in ("expert_params", "shared_expert_params", "specific_expert_params", "ctr_params", "cvr_params"):
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = {**kwargs[key], "activation": activation}
            elif isinstance(kwargs.get(key), list):
                kwargs[key] = [{**d, "activation": activation} for d in kwargs[key]]
    ref_cls, fast_cls = MODELS[model]
    torch.manual_seed(seed)
    ref = ref_cls(dense_features=dense, sparse_features=sparse, sequence_features=sequence, **kwargs).to(dtype)
    fast = fast_cls(dense_features=dense, sparse_features=sparse, sequence_features=sequence, **kwargs).to(dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)
    perturb_batchnorm(ref)
    fast.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(seed)
    draw = rng.randint(2, 9)  # drawn either way: the same configurations as before for a seed
    x = random_inputs(dense, sparse, sequence, batch=batch or draw, generator=gen, dtype=dtype)
    return ref, fast, x


def perturb_batchnorm(model):
    """Non-trivial BN affine and running stats, so eval mode is a real test."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.5)


def forward_backward(model, x, flipped=False):
    """Output and parameter gradients of ``(out * weights).sum()``; ``flipped``: on the batch's
    rows reversed (``flip_rows``), the output flipped back: the same math, other summation orders."""
    model.zero_grad(set_to_none=True)
    out = model(flip_rows(x)).flip(0) if flipped else model(x)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def rounding_spread(model, x, grads: dict) -> float:
    """The largest change of any gradient in ``grads`` (``model``'s on ``x``) when ``model`` runs
    again on the batch's rows reversed: this draw's own rounding, as amplified by its conditioning.
    Runs on a copy (train-mode BatchNorm would move ``model``'s running statistics again)."""
    _, flipped = forward_backward(copy.deepcopy(model), x, flipped=True)
    return max(((flipped[n] - g).abs().max().item() for n, g in grads.items() if g is not None), default=0.0)


def assert_same_gradients(grads_fast: dict, grads_ref: dict, rtol: float, scale_atol: float,
                          spread: float = 0.0) -> None:
    """Every parameter's gradient within ``rtol``; ``scale_atol`` is relative to the model's
    largest gradient, because some gradients are exactly zero in exact arithmetic (a Linear bias
    before train-mode BatchNorm) and float noise in both implementations. ``spread``
    (``rounding_spread`` of the reference): the absolute tolerance is at least 10x that, for
    draws whose conditioning amplifies rounding past ``scale_atol`` even in float64 (a PLE over
    a batch of 4: the reference moved 2.9e-11 = 3.7e-11 of its largest gradient by reversing
    its rows, model seed 995895088)."""
    assert grads_fast.keys() == grads_ref.keys()
    model_scale = max(g.abs().max().item() for g in grads_ref.values() if g is not None)
    atol = max(scale_atol * model_scale, 10 * spread)
    for name, g_ref in grads_ref.items():
        g_fast = grads_fast[name]
        if g_ref is None:
            assert g_fast is None or not g_fast.any(), name
            continue
        assert g_fast is not None, f"{name}: no gradient"
        torch.testing.assert_close(g_fast, g_ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_and_gradients_float64(model, seed, mode):
    ref, fast, x = build_pair(model, seed)
    ref.train(mode == "train")
    fast.train(mode == "train")
    out_ref, grads_ref = forward_backward(ref, x)
    out_fast, grads_fast = forward_backward(fast, x)
    assert out_fast.shape == out_ref.shape
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-12)
    assert_same_gradients(grads_fast, grads_ref, rtol=1e-9, scale_atol=1e-11, spread=rounding_spread(ref, x, grads_ref))
    # Running statistics moved alike (train) or not at all (eval). rtol as for the gradients: a
    # batch variance over 2-9 rows cancels, so two float64 formulas (F.batch_norm's, ours from
    # the bias-free GEMM in double) differ by eps * mean^2 / var: 4.5e-12 relative in one CI run.
    for (name, b_ref), (_, b_fast) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_float32(model, seed, mode):
    """float32 outputs as close to the exact result (the reference in float64 from the same
    weights) as the float32 reference's own runs are: ``assert_as_accurate`` with the batch as
    given, its rows reversed and the weights moved by one ulp (docs/testing.md). Train-mode
    BatchNorm over these tiny batches (2 to 9 rows) amplifies float32 rounding; a fixed
    "within 1e-5, or 1.5x one float32 reference run" failed 2 draws in 800 (PLE, model seeds
    260284766 and 917564219: 1.0e-5 and 1.5e-5, by rounding's luck, with our op or without).
    Draws with a train-mode BatchNorm channel nearly constant over the batch (to 1e-5 relative,
    3-7% of draws) are skipped: ``skip_if_rows_collapse`` says why no float32 comparison can
    judge them. Eval mode has no batch statistics: there the outputs also agree to 1e-5."""
    ref, fast, x = build_pair(model, seed, dtype=torch.float32)
    exact = copy.deepcopy(ref).double()
    flipped, moved = copy.deepcopy(ref), moved_by_one_ulp(ref)
    for m in (ref, fast, exact, flipped, moved):
        m.train(mode == "train")
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    skip_if_rows_collapse(exact, lambda m: m(x64), mode, relative_spread=1e-5)  # nearly identical rows
    with torch.no_grad():
        out_fast, out_ref, out_moved = fast(x), ref(x), moved(x)
        out_flipped = flipped(flip_rows(x)).flip(0)
        out_exact = exact(x64)
    if mode == "eval":
        torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
    assert_as_accurate({"output": out_fast}, [{"output": o} for o in (out_ref, out_flipped, out_moved)],
                       {"output": out_exact}, what="output")


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padded_first_layer_float32(model, mode, monkeypatch):
    """The first layer's input padded with zero columns (what large float32 CPU batches get,
    ``experts._k_padding``; forced here on a small batch, 5 columns whatever the width) loses no
    precision: forward and every gradient as close to the float64 result as without padding, or
    as the float32 reference (the project's yardstick, tests/test_precision.py: the median
    relative error over every element not exactly zero in float64)."""
    from nextrec_fast.layers import experts
    padded = []

    def pad_always(x, out_features, backward=True):
        pad = 5 if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 else 0
        padded.append(pad)
        return pad
    # Four draws pooled, as tests/test_precision.py does, of 64 rows: train-mode BatchNorm over
    # 2-9 rows amplifies whichever rounding a GEMM makes (a batch of 3 gave padded 8.9e-6 against
    # 1.5e-6 unpadded, a batch of 2 errors of 1e-3 for all three), and padding runs from 512 rows.
    seed = random.randrange(2**31)
    errors = {"padded": [], "unpadded": [], "ref": []}
    for draw in range(4):
        results = {}
        for name in ("padded", "unpadded", "ref", "exact"):
            ref, fast, x = build_pair(model, seed + draw, dtype=torch.float32, batch=64)  # the same each time
            m, inputs = (fast, x) if name in ("padded", "unpadded") else (ref, x)
            if name == "exact":
                m, inputs = ref.double(), {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
            monkeypatch.setattr(experts, "_k_padding", pad_always if name == "padded" else lambda x, n, backward=True: 0)
            m.train(mode == "train")
            out, grads = forward_backward(m, inputs)
            results[name] = [out.double()] + [None if g is None else g.double() for g in grads.values()]
        for which in errors:
            errors[which] += [((got - e).abs() / e.abs())[e != 0] for got, e in zip(results[which], results["exact"])
                              if e is not None]
    assert any(padded), "the padded path did not run"
    err = {k: torch.cat(v).median().item() for k, v in errors.items()}
    assert err["padded"] <= max(1.5 * err["unpadded"], 2.0 * err["ref"]), f"{err} (seed {seed})"


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
def test_k_padding_rule(onednn, monkeypatch):
    """Padding for MKL's GEMMs at large float32 batches only; none where oneDNN takes the GEMM."""
    from nextrec_fast.layers import experts
    monkeypatch.setattr(experts, "uses_onednn", lambda a, b: onednn)
    big = experts.K_PAD_MIN_BATCH
    for k in (1, 15, 16, 17, 477, 480):
        assert experts._k_padding(torch.empty(big, k), 256) == (0 if onednn else (-k) % experts.K_PAD_MULTIPLE)
        assert experts._k_padding(torch.empty(big - 1, k), 256) == 0  # small batches: no copies
        assert experts._k_padding(torch.empty(big, k, dtype=torch.float64), 256) == 0
        assert experts._k_padding(torch.empty(big, k), 256, backward=False) == 0  # the gain is the backward's
    monkeypatch.undo()  # the real rule: padding exactly where the GEMM does not go to oneDNN
    from nextrec_fast.ops import dense_gemm
    x = torch.empty(big, 477)
    for n in (1, 256):
        onednn_takes_it = dense_gemm.uses_onednn(x, torch.empty(n, 477).t())
        assert experts._k_padding(x, n) == (0 if onednn_takes_it else 3), (n, onednn_takes_it)


@pytest.mark.parametrize("model", list(MODELS))
def test_k_padding_only_where_a_backward_runs(model, monkeypatch):
    """The first layer asks for padding with ``backward`` True exactly where autograd will run
    a backward through its GEMM: in a forward with gradients (train or eval mode), not under
    ``torch.no_grad`` or ``inference_mode`` (the eval forward was 4-8% faster unpadded), nor
    where neither the input nor the weights need a gradient."""
    from nextrec_fast.layers import experts
    seed = random.randrange(2**31)
    original, flags = experts._k_padding, []
    monkeypatch.setattr(experts, "_k_padding",
                        lambda x, n, backward=True: flags.append(backward) or original(x, n, backward=backward))
    _, fast, x = build_pair(model, seed, dtype=torch.float32, batch=300)  # above the per-expert GEMM batches

    def frozen():
        fast.requires_grad_(False)
        try:
            fast(x)
        finally:
            fast.requires_grad_(True)

    def no_grad():
        with torch.no_grad():
            fast(x)

    def inference():
        with torch.inference_mode():
            fast(x)

    cases = {"train": (True, lambda: fast(x).sum().backward(), True),
             "eval, grad enabled": (False, lambda: fast(x).sum().backward(), True),
             "eval, no_grad": (False, no_grad, False), "eval, inference_mode": (False, inference, False),
             "train, frozen weights": (True, frozen, False)}
    for case, (training, run, expected) in cases.items():
        fast.train(training)
        flags.clear()
        run()
        assert flags and all(f is expected for f in flags), f"{case}: {flags} (seed {seed})"


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch", [3, 200, 300])
def test_small_batches_without_autograd(model, mode, batch, monkeypatch):
    """Without autograd, batches up to ``PER_EXPERT_GEMM_MAX_BATCH`` run one GEMM per expert into
    an ``[E, B, N]`` output (``experts._expert_mm``) instead of concatenating the experts' weights:
    the same outputs and running statistics as the reference (float64), and that path runs
    exactly at those batch sizes (ReLU experts: the C++ path, which is where it lives)."""
    from nextrec_fast.layers import experts
    calls = []
    real = experts._expert_mm
    monkeypatch.setattr(experts, "_expert_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed = random.randrange(2**31)
    ref, fast, x = build_pair(model, seed, batch=batch, activation="relu")
    for m in (ref, fast):
        m.train(mode == "train")
    with torch.no_grad():
        out_ref, out_fast = ref(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{m} (seed {seed})")
    for (name, b_ref), (_, b_fast) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m} (seed {seed})")
    from nextrec_fast.ops import batch_norm_act
    if batch_norm_act.is_available():
        assert bool(calls) == (batch <= experts.PER_EXPERT_GEMM_MAX_BATCH), (batch, len(calls), seed)


def test_per_expert_gemm_rule():
    """When ``_expert_mm`` (one GEMM per expert, ``out=``) may replace the batched GEMM: small
    CPU batches without autograd, one dtype, and not under autocast, which skips ops given
    ``out=`` (the GEMMs would run in float32 instead of bfloat16). The C++ path that calls it is
    off under autocast today; this keeps the rule right on its own."""
    from nextrec_fast.layers import experts
    linears = [nn.Linear(8, 4) for _ in range(3)]
    small, large = torch.randn(experts.PER_EXPERT_GEMM_MAX_BATCH, 8), torch.randn(experts.PER_EXPERT_GEMM_MAX_BATCH + 1, 8)
    with torch.no_grad():
        assert experts._per_expert_gemms([small], linears)
        assert not experts._per_expert_gemms([large], linears)
        assert not experts._per_expert_gemms([small.double()], linears)  # mixed dtypes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not experts._per_expert_gemms([small], linears)
    assert not experts._per_expert_gemms([small], linears)  # autograd records the weights
    for lin in linears:
        lin.weight.requires_grad_(False)
    assert not experts._per_expert_gemms([small], linears)  # trainable biases alone (BitFit): addmm(out=) raises
    assert experts._per_expert_gemms([small], [lin.requires_grad_(False) for lin in linears])


@pytest.mark.parametrize("seed", SEEDS[1:2])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bias_only_training_at_small_batches(model, seed, mode):
    """Every weight and table frozen, the MLPs' biases trained (BitFit), batch 64: the first
    layer's input and weights need no gradient, so the per-expert path (no autograd) runs it
    and the BatchNorm op after it takes the bias's gradient. Outputs and bias gradients as the
    reference's, float64. (The rule's own checks, biases included: ``test_per_expert_gemm_rule``.)"""
    ref, fast, x = build_pair(model, seed, batch=64)
    for m in (ref, fast):
        m.train(mode == "train")
        for name, p in m.named_parameters():
            p.requires_grad_(name.endswith("bias") and not name.startswith("embedding."))  # the MLPs' biases
    out_ref, grads_ref = forward_backward(ref, x)
    out_fast, grads_fast = forward_backward(fast, x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-12)
    assert {n for n, g in grads_fast.items() if g is not None} == {n for n, g in grads_ref.items() if g is not None}
    assert_same_gradients(grads_fast, grads_ref, rtol=1e-9, scale_atol=1e-11, spread=rounding_spread(ref, x, grads_ref))


def _poisoned(make):
    """``make`` (an allocator), its floating-point results NaN-filled."""
    def allocate(*args, **kwargs):
        t = make(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    return allocate


def _poison_allocations(monkeypatch):
    """``torch.empty``, ``torch.empty_strided`` and ``Tensor.new_empty`` return NaN-filled
    floating-point tensors: a GEMM slice that an ``out=`` loop never wrote shows up as NaN."""
    real_empty, real_strided, real_new_empty = torch.empty, torch.empty_strided, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", _poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_strided", _poisoned(real_strided))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(real_new_empty))


def _cpu_gemm_path(monkeypatch, gemm: str, experts_count: int) -> list:
    """Send ``expert_bmm`` down ``gemm``: "per_expert" (threads a multiple of no expert count) or
    "reused_bmm" (threads dividing every count, every output size pooled); returns the list that
    records each ``_ExpertBmm`` call's ``per_expert`` flag."""
    from nextrec_fast.layers import experts
    from nextrec_fast.ops import reusable_buffer
    if gemm == "reused_bmm":
        if not reusable_buffer.is_available():
            pytest.skip("the C++ extension is not built: no reusable buffers")
        monkeypatch.setattr(experts, "_cpu_threads", lambda: 1)
        monkeypatch.setattr(reusable_buffer, "MIN_BYTES", 0)
    else:
        monkeypatch.setattr(experts, "_cpu_threads", lambda: 1009)  # a prime above any expert count drawn
    calls = []
    real_apply = experts._ExpertBmm.apply
    monkeypatch.setattr(experts._ExpertBmm, "apply", lambda *a: calls.append(a[-1]) or real_apply(*a))
    return calls


def _poison_reusable_buffers(monkeypatch):
    """Reused buffers hold the last step's values: NaN-fill them as ``_poison_allocations`` does."""
    from nextrec_fast.ops import reusable_buffer
    monkeypatch.setattr(reusable_buffer, "reusable_empty", _poisoned(reusable_buffer.reusable_empty))


@pytest.mark.parametrize("experts_count", [1, 3, 5])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", ["expert_major", "batch_major_view"])
@pytest.mark.parametrize("gemm", ["per_expert", "reused_bmm"])
def test_expert_bmm_out_paths(experts_count, with_bias, layout, gemm, monkeypatch):
    """``experts.expert_bmm`` through ``_ExpertBmm`` (one GEMM per expert when the experts do not
    divide over the threads; else one bmm into reused buffers) against ``torch.bmm`` / ``baddbmm``
    in float64: output, the input's, every stacked weight's and bias's gradient, each weight's
    gradient in the weight's own strides (per expert), and the double backward
    (``create_graph=True``). Outputs poisoned with NaN."""
    from nextrec_fast.layers import experts
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    batch, k, n = experts.PER_EXPERT_BMM_MIN_ROWS + 3, 7, 5
    weights = [torch.randn(n, k, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(experts_count)]
    biases = [torch.randn(n, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(experts_count)]
    shape = (batch, experts_count, k) if layout == "batch_major_view" else (experts_count, batch, k)
    x_leaf = torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_()
    upstream = torch.randn(experts_count, batch, n, dtype=torch.float64, generator=gen)
    params = [x_leaf, *weights, *(biases if with_bias else [])]

    def run(bmm):
        x = x_leaf.transpose(0, 1) if layout == "batch_major_view" else x_leaf  # [E, B, K]
        weight_t = torch.stack(weights).transpose(1, 2)  # [E, K, N], as ExpertBank._bmm builds it
        bias = torch.stack(biases).unsqueeze(1) if with_bias else None
        out = bmm(x, weight_t, bias)
        grads = torch.autograd.grad((out * upstream).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads if g.requires_grad), params, allow_unused=True)
        first = torch.autograd.grad((bmm(x, weight_t, bias) * upstream).sum(), params)  # no graph: the mm path
        return out, first, grads, second

    expected = run(lambda x, w, b: torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w))
    calls = _cpu_gemm_path(monkeypatch, gemm, experts_count)
    _poison_allocations(monkeypatch)
    _poison_reusable_buffers(monkeypatch)
    got = run(experts.expert_bmm)
    monkeypatch.undo()
    assert calls and all(per_expert == (gemm == "per_expert") for per_expert in calls), calls
    out, first, grads, second = got
    torch.testing.assert_close(out, expected[0], rtol=1e-12, atol=1e-12, msg=lambda m: f"output: {m} (seed {seed})")
    for name, g, e in zip(["x"] + [f"weight/bias {i}" for i in range(len(params) - 1)], first, expected[1]):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m} (seed {seed})")
    for w, g in zip(weights, first[1:1 + experts_count]):
        assert g.stride() == w.stride(), (g.stride(), w.stride())
    for g, e in zip(second, expected[3]):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"double backward: {m} (seed {seed})")


@pytest.mark.parametrize("input_of", [[0, 0, 1, 1, 2, 2], [0, 1, 1, 0], [1, 0]], ids=["ple", "shared_twice", "two"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_runs_linear(input_of, with_bias, monkeypatch):
    """The first layer of experts reading several inputs (PLE's upper levels) through
    ``experts._RunsLinear`` (each run of experts sharing an input writes its column block of one
    output) against ``F.linear`` per run and ``torch.cat`` in float64: output, every input's,
    weight's and bias's gradient (an input read by two runs gets both), and the double backward.
    Allocations and reused buffers poisoned with NaN; the Function must have run."""
    from nextrec_fast.layers import experts
    from nextrec_fast.ops import reusable_buffer
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    batch, k, n = 33, 7, 5
    mlps = [nn.Sequential(nn.Linear(k, n, bias=with_bias), nn.ReLU()).double() for _ in input_of]
    for mlp in mlps:
        for p in mlp.parameters():
            p.data.copy_(torch.randn(p.shape, dtype=torch.float64, generator=gen))
    inputs = [torch.randn(batch, k, dtype=torch.float64, generator=gen).requires_grad_()
              for _ in range(max(input_of) + 1)]
    params = [*inputs, *(p for mlp in mlps for p in mlp.parameters())]
    upstream = torch.randn(batch, len(mlps), n, dtype=torch.float64, generator=gen)

    def run():
        out = experts.run_experts(mlps, inputs, input_of)
        grads = torch.autograd.grad((out * upstream).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), params, allow_unused=True)
        first = torch.autograd.grad((experts.run_experts(mlps, inputs, input_of) * upstream).sum(), params)
        return out, first, second

    monkeypatch.setattr(experts, "_runs_linear_usable", lambda parts: False)
    expected = run()
    monkeypatch.undo()
    calls = []
    real_apply = experts._RunsLinear.apply
    monkeypatch.setattr(experts._RunsLinear, "apply", lambda *a: calls.append(a[0]) or real_apply(*a))
    monkeypatch.setattr(reusable_buffer, "MIN_BYTES", 0)
    _poison_allocations(monkeypatch)
    _poison_reusable_buffers(monkeypatch)
    got = run()
    monkeypatch.undo()
    runs = len(experts._shared_input_runs(inputs, input_of, len(input_of)))
    assert calls and set(calls) == {runs}, (calls, runs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12, msg=lambda m: f"output: {m} (seed {seed})")
    for kind, gots, wants in (("gradient", got[1], expected[1]), ("double backward", got[2], expected[2])):
        for i, (g, e) in enumerate(zip(gots, wants)):
            if e is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{kind} of tensor {i}: {m} (seed {seed})")


def test_runs_linear_float32_strided_inputs_through_onednn_and_double_backward(monkeypatch):
    """``linear_runs`` on float32 inputs that are strided slices of one ``[B, G, K]`` tensor (a
    gate mixture's output, as PLE's upper levels get), every GEMM sent to oneDNN: the output, the
    gradients and a double backward (``create_graph=True``, a gradient penalty through the
    inputs) against ``F.linear`` + ``torch.cat`` in float64, within float32 rounding."""
    from nextrec_fast.layers import experts
    from nextrec_fast.ops import dense_gemm
    if not dense_gemm.is_available():
        pytest.skip(f"oneDNN's float32 GEMM is not available here: {dense_gemm.unavailable_reason()}")
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    batch, groups, k, n = 64, 3, 24, 16
    mixed = torch.randn(batch, groups, k, generator=gen, requires_grad=True)
    weights = [torch.randn(n, k, generator=gen, requires_grad=True) for _ in range(groups)]
    biases = [torch.randn(n, generator=gen, requires_grad=True) for _ in range(groups)]
    upstream = torch.randn(batch, groups * n, generator=gen)
    params = [mixed, *weights, *biases]

    def run(linear, dtype):
        ps = [p.detach().to(dtype).requires_grad_() for p in params]
        parts = [(ps[0][:, g], ps[1 + g], ps[1 + groups + g]) for g in range(groups)]
        out = linear(parts)
        grads = torch.autograd.grad((out * upstream.to(dtype)).sum(), ps, create_graph=True)
        penalty = sum((g * g).sum() for g in grads[:1 + groups])  # through the input and the weights
        second = torch.autograd.grad(penalty, ps[:1 + groups])
        return [out, *grads, *second]

    expected = run(lambda parts: torch.cat([F.linear(*p) for p in parts], dim=1), torch.float64)
    calls_before = torch.ops.nextrec_fast.onednn_gemm_calls()
    monkeypatch.setattr(dense_gemm, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(dense_gemm, "routed", lambda: True)  # on Intel CPUs too
    used = []
    real_apply = experts._RunsLinear.apply
    monkeypatch.setattr(experts._RunsLinear, "apply", lambda *a: used.append(a[0]) or real_apply(*a))
    got = run(experts.linear_runs, torch.float32)
    assert used == [groups] and torch.ops.nextrec_fast.onednn_gemm_calls() > calls_before
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-3, msg=lambda m: f"result {i}: {m} (seed {seed})")


@pytest.mark.parametrize("input_of", [[0, 0], [0], [0, 1, 1]], ids=["shared", "one", "two_inputs"])
def test_gate_logits_through_runs_linear(input_of, monkeypatch):
    """``gates.gate_logits`` with every logit GEMM sent through ``experts._RunsLinear`` (as where
    oneDNN takes it) against each gate's own ``nn.Linear`` in float64: logits, the inputs', weights'
    and biases' gradients. Allocations and reused buffers poisoned with NaN."""
    from nextrec_fast.layers import experts, gates as gate_ops
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    batch, k = 17, 6
    gates = [nn.Sequential(nn.Linear(k, 3 + g), nn.Softmax(dim=1)).double() for g in range(len(input_of))]
    for gate in gates:
        for p in gate.parameters():
            p.data.copy_(torch.randn(p.shape, dtype=torch.float64, generator=gen))
    inputs = [torch.randn(batch, k, dtype=torch.float64, generator=gen).requires_grad_()
              for _ in range(max(input_of) + 1)]
    per_gate = [inputs[i] for i in input_of]
    params = [*inputs, *(p for gate in gates for p in gate.parameters())]
    upstream = [torch.randn(batch, 3 + g, dtype=torch.float64, generator=gen) for g in range(len(gates))]

    def run(logits_of):
        logits = logits_of()
        loss = sum((lg * u).sum() for lg, u in zip(logits, upstream))
        return logits, torch.autograd.grad(loss, params)

    expected = run(lambda: [gate[0](x) for gate, x in zip(gates, per_gate)])
    calls = []
    real_apply = experts._RunsLinear.apply
    monkeypatch.setattr(experts._RunsLinear, "apply", lambda *a: calls.append(a[0]) or real_apply(*a))
    monkeypatch.setattr(experts, "uses_onednn", lambda a, b: True)
    _poison_allocations(monkeypatch)
    _poison_reusable_buffers(monkeypatch)
    got = run(lambda: gate_ops.gate_logits(gates, per_gate))
    monkeypatch.undo()
    assert calls == [len(set(input_of))], calls
    for g, e in zip(got[0], expected[0]):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"logits: {m} (seed {seed})")
    for i, (g, e) in enumerate(zip(got[1], expected[1])):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"gradient {i}: {m} (seed {seed})")


def test_cpu_gemm_mode_rule(monkeypatch):
    """How ``expert_bmm`` runs. One GEMM per expert: CPU, experts not a multiple of the threads
    (bmm gives each expert one thread: 3 experts on 2 threads take as long as 4), at least
    ``PER_EXPERT_BMM_MIN_ROWS`` rows. One bmm into a reused buffer: otherwise, with an output of
    at least ``reusable_buffer.MIN_BYTES``. Both only for one float32/float64 dtype, not under
    autocast (out= skips its casts) and not while tracing (out= into slices does not trace)."""
    from nextrec_fast.layers import experts
    from nextrec_fast.ops import reusable_buffer
    rows = experts.PER_EXPERT_BMM_MIN_ROWS
    x, w = torch.randn(3, rows, 4), torch.randn(3, 4, 2)
    monkeypatch.setattr(experts, "_cpu_threads", lambda: 2)
    assert experts._cpu_gemm_mode(x, w) == "per_expert"
    assert experts._cpu_gemm_mode(x.double(), w.double()) == "per_expert"
    assert experts._cpu_gemm_mode(torch.randn(4, rows, 4), torch.randn(4, 4, 2)) is None  # 4 experts, 2 threads, small
    assert experts._cpu_gemm_mode(x[:, :rows - 1], w) is None  # few rows, small
    assert experts._cpu_gemm_mode(x, w.double()) is None  # mixed dtypes
    assert experts._cpu_gemm_mode(x.bfloat16(), w.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert experts._cpu_gemm_mode(x, w) is None
    monkeypatch.setattr(experts, "_cpu_threads", lambda: 1)
    assert experts._cpu_gemm_mode(x, w) is None  # one thread: bmm is as fast; the output is small
    big_rows = reusable_buffer.MIN_BYTES // (4 * 4 * 2) + 1  # [4, big_rows, 2] float32 >= MIN_BYTES
    big = torch.randn(4, big_rows, 2), torch.randn(4, 2, 2)
    expected = "bmm" if reusable_buffer.is_available() else None
    assert experts._cpu_gemm_mode(*big) == expected
    assert experts._cpu_gemm_mode(big[0][:, :big_rows // 2], big[1]) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert experts._cpu_gemm_mode(*big) is None


def test_torch_backend_calls_no_extension_op():
    """``NEXTREC_FAST_BACKEND=torch`` means no C++ extension: the expert bank and the gates'
    mixture at a batch whose GEMM outputs the pool would take call none of our ops."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from nextrec_fast.layers.experts import ExpertBank
    from nextrec_fast.layers.gates import mix_experts

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    mlps = [nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
            for _ in range(4)]
    x = torch.randn(2048, 64, requires_grad=True)
    with nextrec_fast.use_backend("torch"), Ops() as ops:
        y = ExpertBank(mlps)([x])
        mixed = mix_experts([torch.randn(2048, 4)], y)
        (mixed.sum() + y.sum()).backward()
    assert not [n for n in ops.names if n.startswith("nextrec_fast")], sorted(ops.names)


def test_empty_cache_releases_free_buffers_only():
    """``nextrec_fast.empty_cache`` drops the pool: it reports the bytes of the buffers nothing
    used, and a buffer still in use stays valid (and is not counted)."""
    from nextrec_fast.ops import reusable_buffer
    if not reusable_buffer.is_available():
        assert nextrec_fast.empty_cache() == 0
        pytest.skip("the C++ extension is not built: no pool")
    like = torch.empty(0)
    shape = (5, reusable_buffer.MIN_BYTES // 4 // 5 + 11)
    nextrec_fast.empty_cache()
    a = reusable_buffer.reusable_empty(like, shape)
    nbytes = a.numel() * a.element_size()  # not untyped_storage(): its Python object would pin the buffer
    del a
    assert nextrec_fast.empty_cache() >= nbytes
    b = reusable_buffer.reusable_empty(like, shape).fill_(3.0)
    assert nextrec_fast.empty_cache() == 0
    assert torch.equal(b, torch.full(shape, 3.0))


def test_export_with_a_dynamic_batch():
    """``torch.export`` of an expert bank with a dynamic batch: no size test of ours (the pooled
    first linear's, the small-batch GEMMs', the K padding's) may become a guard on it; the
    program matches eager at two batch sizes."""
    from torch.export import Dim
    from nextrec_fast.layers.experts import ExpertBank

    class Bank(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)) for _ in range(2))

        def forward(self, x):
            return ExpertBank(list(self.mlps))([x])

    torch.manual_seed(0)
    module = Bank().eval().double()
    program = torch.export.export(module, (torch.randn(2000, 16, dtype=torch.float64),),
                                  dynamic_shapes=({0: Dim("batch", min=2, max=100000)},))
    for batch in (300, 20000):
        x = torch.randn(batch, 16, dtype=torch.float64)
        torch.testing.assert_close(program.module()(x), module(x), rtol=1e-12, atol=1e-12)


def test_reusable_empty_reuses_only_unreferenced_buffers():
    """``reusable_empty`` hands a pooled buffer out again only once nothing references it: not
    while a tensor, a view or a tensor saved for backward holds it."""
    from nextrec_fast.ops import reusable_buffer
    if not reusable_buffer.is_available():
        pytest.skip("the C++ extension is not built: no reusable buffers")
    like = torch.empty(0)
    shape = (3, reusable_buffer.MIN_BYTES // 4 // 3 + 7)  # an unusual size: no other test's buffer
    a = reusable_buffer.reusable_empty(like, shape)
    assert a.shape == shape and a.dtype == like.dtype and a.is_contiguous()
    pointer = a.data_ptr()
    view = a[1:]
    del a
    b = reusable_buffer.reusable_empty(like, shape)
    assert b.data_ptr() != pointer, "a buffer still referenced by a view was handed out"
    del view
    c = reusable_buffer.reusable_empty(like, shape)
    assert c.data_ptr() == pointer, "a free pooled buffer was not reused"
    w = torch.randn(shape[1], 2, requires_grad=True)
    y = (c @ w).sum()  # saves c for backward
    del c
    d = reusable_buffer.reusable_empty(like, shape)
    assert d.data_ptr() != pointer, "a buffer saved for backward was handed out"
    y.backward()


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("gemm", ["per_expert", "reused_bmm"])
def test_models_with_one_gemm_per_expert(model, mode, gemm, monkeypatch):
    """Whole models with every batched expert GEMM through ``_ExpertBmm``: one GEMM per expert
    (the thread count made a multiple of no expert count, batch 200 >= ``PER_EXPERT_BMM_MIN_ROWS``;
    what PLE's grouped upper levels and odd expert counts get on a multi-core CPU), or one bmm
    into reused, NaN-poisoned buffers (what large batches get). Outputs, every gradient and the
    running statistics as the reference's, float64."""
    calls = _cpu_gemm_path(monkeypatch, gemm, 0)
    _poison_reusable_buffers(monkeypatch)
    seed = random.randrange(2**31)
    ref, fast, x = build_pair(model, seed, batch=200, activation="relu")
    for m in (ref, fast):
        m.train(mode == "train")
    out_ref, grads_ref = forward_backward(ref, x)
    out_fast, grads_fast = forward_backward(fast, x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{m} (seed {seed})")
    assert_same_gradients(grads_fast, grads_ref, rtol=1e-9, scale_atol=1e-11, spread=rounding_spread(ref, x, grads_ref))
    for (name, b_ref), (_, b_fast) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m} (seed {seed})")
    assert calls, f"no batched expert GEMM ran through _ExpertBmm (seed {seed})"
