"""The installed nextrec generation, for tests that run against whichever one CI installed.

``GENERATION`` is "0.3", "0.6" or None (no nextrec). ``require(generation)`` skips a test module
written for one generation's API when another is installed, with the reason. For 0.6:
random models across the options nextrec offers (``random_v06_model``), the probabilities a user
sees (``predict_proba``), and nextrec itself run in float64 (``nextrec_float64``), the yardstick
of the parity tests.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import random

import pytest
import torch


def _generation() -> str | None:
    if importlib.util.find_spec("nextrec") is None:
        return None
    if importlib.util.find_spec("nextrec.models.multitask") is not None:
        return "0.6"
    if importlib.util.find_spec("nextrec.models.multi_task") is not None:
        return "0.3"
    return "unknown"


GENERATION = _generation()


def require(generation: str) -> None:
    """Skip the calling test module unless nextrec ``generation`` is installed."""
    if GENERATION is None:
        pytest.skip("nextrec is not installed (CI installs 0.3.1 and 0.6.14: see .ci/run)", allow_module_level=True)
    if GENERATION != generation:
        pytest.skip(f"tests nextrec {generation}'s API; nextrec {GENERATION} is installed (CI runs each generation "
                    "in its own environment)", allow_module_level=True)


def case_seed(run_seed: int, *parts) -> int:
    """A test case's seed from the run's seed (``NEXTREC_FAST_TEST_SEED``) and the case's
    parameters, printed, so a red case replays with the printed run seed."""
    seed = (run_seed + sum(map(ord, "/".join(map(str, parts))))) % 2**31
    print(f"seed={seed} (NEXTREC_FAST_TEST_SEED={run_seed})")
    return seed


def predict_proba(model, x):
    """What the user's training loop sees: 0.6 applies the head (and ESMM's ctcvr) after forward."""
    if hasattr(model, "call_model"):
        return model.training_adapter.forward(model, x)
    return model(x)


@contextlib.contextmanager
def nextrec_float64():
    """nextrec 0.6 hard-codes ``.float()`` (dense values, sequence masks, mean counts); inside this
    context ``Tensor.float`` gives float64, so a ``.double()`` nextrec model computes in float64."""
    original = torch.Tensor.float

    def to_double(self, *args, **kwargs):
        return self.to(torch.float64, *args, **kwargs)

    torch.Tensor.float = to_double
    try:
        yield
    finally:
        torch.Tensor.float = original


def flip_rows(x: dict) -> dict:
    """The batch with its rows in reverse order: the same math (every op is per row or a sum over
    rows), another float32 rounding (BatchNorm's statistics and the weight gradients sum in
    another order). Flip the outputs back before weighting them."""
    return {k: v.flip(0) for k, v in x.items()}


def moved_by_one_ulp(model):
    """A copy of ``model`` with every parameter multiplied by ``1 + 2**-23`` (one float32 ulp, or
    less): a third plain run for ``assert_as_accurate``, whose distance from the float64 truth
    measures how far the draw's conditioning carries a rounding-sized change of the inputs.

    Why: where a result amplifies its inputs' rounding, the fast and the plain model round those
    inputs differently, and reversing the rows (``flip_rows``) does not change a per-row rounding,
    so two plain runs can agree with each other and miss the spread. Seen: a 0.6 PLE whose
    2-channel LayerNorm got two values 6e-4 apart (relative) in one row: ours 1.5e-4 from float64,
    plain 2.4e-6 in both runs (bound 8.9e-5)."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1 + 2**-23)
    return moved


# Jittered plain runs per parity test: in the draw that showed the need, 3 of 6 jittered runs saw
# the conditioning (errors ~1e-2, the rest ~1e-4); with 4, all four miss it 1 time in 16.
JITTERED = 4


def jittered_by_one_ulp(model, seed: int):
    """A copy of ``model`` with every parameter element multiplied by ``1 + u * 2**-23``, u drawn
    from {-1, 0, 1} (``seed``): a plain run for ``assert_as_accurate`` that, unlike
    ``moved_by_one_ulp``, changes the weights' ratios.

    Why: a normalisation is blind to a uniform move. LayerNorm (and BatchNorm) divide the scale of
    their input out, so the weights moved all alike by one ulp leave a narrow LayerNorm's output
    as it was, while any other rounding of its input (ours: one GEMM over all experts' weights)
    goes through its conditioning. Seen: a 0.6 MMOE whose experts start with a 2-channel
    LayerNorm: ours 1.0e-2 from float64 in a gradient, the three plain runs at most 6.8e-4,
    six jittered runs 8.5e-5 to 1.1e-2."""
    jittered = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in jittered.parameters():
            if p.is_floating_point():
                p.mul_(1 + torch.randint(-1, 2, p.shape, generator=gen).to(p.dtype) * 2.0**-23)
    return jittered


def accuracy_bounds(fast: dict, plain, truth: dict, factor: float = 10.0, relative_floor: float | None = None,
                    noise_floor: float = 1e-5) -> dict:
    """``{name: (err_fast, bound, err_plain)}`` for ``assert_as_accurate`` (its docstring: the
    bound is ``factor * err_plain + floor``). ``relative_floor``: instead of the set's floor, a
    floor per tensor of ``relative_floor * max |truth|`` of that tensor plus ``noise_floor * max
    |truth|`` over the set: for bfloat16, where the set's worst plain error would hide a small
    tensor's wrong gradient (tests/test_autocast.py)."""
    err_plain = plain_errors(plain, truth)
    scale = max((truth[n].abs().max().item() for n in err_plain), default=0.0)
    set_floor = max(noise_floor * scale, max(err_plain.values(), default=0.0))
    bounds = {}
    for n in err_plain:
        floor = (set_floor if relative_floor is None
                 else noise_floor * scale + relative_floor * truth[n].abs().max().item())
        err_fast = (fast[n].double() - truth[n]).abs().max().item() if fast.get(n) is not None else float("inf")
        bounds[n] = (err_fast, factor * err_plain[n] + floor, err_plain[n])
    return bounds


def plain_errors(plain, truth: dict) -> dict:
    """``{name: worst max-abs error from truth over the plain runs}`` for every tensor the truth
    and all runs (one dict, or a list of dicts name -> tensor) have."""
    plains = plain if isinstance(plain, (list, tuple)) else [plain]
    names = [n for n, t in truth.items() if t is not None and all(p.get(n) is not None for p in plains)]
    return {n: max((p[n].double() - truth[n]).abs().max().item() for p in plains) for n in names}


def assert_as_accurate(fast: dict, plain, truth: dict, what: str = "gradient", factor: float = 10.0,
                       relative_floor: float | None = None, noise_floor: float = 1e-5) -> None:
    """Each fast float32 tensor is as close to the float64 truth as the plain float32 model is:
    ``err_fast <= factor * err_plain + floor`` per tensor (``factor`` 10), where ``plain`` is one or
    more float32 runs of the plain model (dicts name -> tensor; ``err_plain`` the worst of them),
    and the floor is the larger of float32 noise relative to the whole set (``1e-5 * max |truth|``)
    and the plain runs' worst error over the set (``relative_floor``: ``accuracy_bounds``).

    Why two plain runs (the batch as given and ``flip_rows``) and a floor over the set: in an
    ill-conditioned draw (train-mode BatchNorm over 2-4 rows of 1e-4-sized embeddings) rounding
    moves every tensor upstream of a tiny-variance channel by luck, in both models but not alike.
    Measured over 480 such MMOE / PLE draws, fast vs one plain run: the worst-error ratio
    reached 126x (and per-tensor ratios failed 1 draw in 200), while fast ran 1600x *more*
    accurate in others; against the worse of two plain runs the ratio stayed <= 4x. A wrong
    gradient's error is the size of the gradient itself, far above both terms."""
    for n, (err_fast, bound, err_plain) in accuracy_bounds(fast, plain, truth, factor, relative_floor,
                                                           noise_floor).items():
        assert fast.get(n) is not None, f"{what} {n}: missing"
        assert err_fast <= bound, (
            f"{what} {n}: fast error {err_fast:.3g}, plain error {err_plain:.3g}, allowed {bound:.3g}")


def assert_predicts_as_plain(fast, plain, x: dict, forward=predict_proba, what: str = "output") -> None:
    """``forward(fast, x)`` is as close to float64 as ``forward(plain, x)`` (``assert_as_accurate``),
    for two float32 models holding the same weights, in eval mode (eval: ``flip_rows`` then gives
    the same math in another rounding, the second plain run). The float64 truth is a deep copy of
    ``plain`` under ``nextrec_float64``.

    Why not ``assert_close`` at rtol 1e-5 / atol 1e-6: in an ill-conditioned draw fast and plain
    round apart by more. nextrec 0.6.14 PLE, seed 11595: outputs 1.9e-5 apart (2.9x that bound),
    fast 1.9e-5 from float64, plain 3.8e-5 and 9.6e-7 (flipped); 1 draw in 3000 over ESMM / MMOE /
    PLE. A wrong load or a wrong kernel errs by about the output's size, far above the floor."""
    assert not fast.training and not plain.training, "eval mode: flip_rows must not change the math"
    truth = copy.deepcopy(plain).double()
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    with torch.no_grad():
        got = forward(fast, x)
        ref = [forward(plain, x), forward(plain, flip_rows(x)).flip(0)]
        with nextrec_float64():
            true = forward(truth, x64)
    assert got.shape == true.shape, f"{what}: shape {tuple(got.shape)}, nextrec's {tuple(true.shape)}"
    assert_as_accurate({what: got}, [{what: r} for r in ref], {what: true}, what=what)


def skip_if_rows_collapse(model, forward, mode: str, relative_spread: float = 1e-9) -> None:
    """Skip an ill-posed draw: in train mode, a BatchNorm channel whose input is the same on every
    row of the batch (to 1e-9 relative, in float64). BatchNorm then outputs its bias plus rounding
    noise times ``weight / sqrt(eps)``, and the next activation's kink (ReLU, PReLU, SELU at 0,
    where BatchNorm's bias starts) takes one side or the other by luck, in float64 as in float32:
    that gradient is a coin flip, not something a comparison can judge. It happens when every row
    is alike, e.g. nextrec's 1e-4-sized embeddings through a train-mode BatchNorm (eps 1e-5 does
    not normalise them) and a shrink activation zero every expert (seen: towers' BatchNorm bias
    gradient 0.7 from float64 in ours, 8e-8 in nextrec's, by the side each run's rounding took).
    ``forward(m)`` runs ``m`` (a copy of ``model``, the float64 truth) on the test's batch.

    ``relative_spread``: a channel counts as constant when its spread over the batch is at most
    this fraction of its magnitude. 1e-9 catches exact collapse (1-4% of the parity tests'
    draws); a test that compares one float32 output may pass 1e-5 (3-7% of draws), where
    float32's own rounding of the channel's input (6e-8 relative) is 1% of its spread or more:
    near-identical rows round alike in the plain model, so its error stays common to the rows
    and the next train-mode BatchNorm subtracts it, while any other summation order's does not
    (seen: a PLE over 3 near-identical rows, 2.5e-6 relative spread, model seed 917564219: the fast path
    10-1000x closer to float64 at every layer but the last BatchNorm, after which the plain
    run was 7.6e-8 off and ours 1.5e-5)."""
    if mode != "train":
        return
    probe, constant = copy.deepcopy(model), []

    def record(name):
        def hook(module, args):
            v = args[0].detach()
            v = v.transpose(0, 1).reshape(v.shape[1], -1)  # [C, rows (x length)]
            flat = (v.amax(1) - v.amin(1)) <= relative_spread * (1 + v.abs().amax(1))
            constant.extend(f"{name}[{c}]" for c in flat.nonzero().flatten().tolist())
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in probe.named_modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    try:
        with torch.no_grad():
            forward(probe)
    finally:
        for h in handles:
            h.remove()
    if constant:
        pytest.skip(f"ill-posed draw: train-mode BatchNorm channels constant over the batch to {relative_spread:g} relative "
                    f"({', '.join(constant[:4])}"
                    f"{', ...' if len(constant) > 4 else ''}): their gradients are rounding's coin flips")


def assert_regularized_grads_as_accurate(plain, model, x: dict, forward=predict_proba) -> None:
    """After ``(forward(m, x).sum() + m.add_reg_loss()).backward()`` in eval mode, the accelerated
    ``model``'s regularisation value and every parameter's gradient are as close to float64
    nextrec as the plain float32 model's (``assert_as_accurate``; the plain runs: the batch as
    given, ``flip_rows``, ``moved_by_one_ulp``). ``plain`` is the un-accelerated copy holding the
    same weights.

    Why not ``assert_close`` against plain at rtol 1e-4 / atol 1e-5 x the largest gradient: the
    sequence embedding's gradient passes through attention pooling, where float32 rounds apart by
    more. nextrec 0.6.14 MMOE, NEXTREC_FAST_TEST_SEED=393801047 (red in CI): seq0's gradient
    5.3e-5 from plain's (2e-5 allowed), with ours 1.9e-5 from float64 and plain 3.3e-5."""
    truth = copy.deepcopy(plain).double()
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}

    def run(m, batch, flipped=False):
        m.eval()
        m.zero_grad(set_to_none=True)
        reg = m.add_reg_loss()
        # sum over rows and tasks: reversing the rows changes only float32's summation order
        (forward(m, flip_rows(batch) if flipped else batch).sum() + reg).backward()
        grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in m.named_parameters()}
        return torch.as_tensor(reg).detach(), grads

    reg_fast, g_fast = run(model, x)
    reg_plain, g_plain = run(plain, x)
    _, g_flipped = run(plain, x, flipped=True)
    _, g_moved = run(moved_by_one_ulp(plain), x)
    with nextrec_float64():
        reg_truth, g_truth = run(truth, x64)
    assert_as_accurate({"add_reg_loss": reg_fast}, {"add_reg_loss": reg_plain}, {"add_reg_loss": reg_truth},
                       what="regularisation")
    for name, g in g_plain.items():
        if g is None:
            assert g_fast[name] is None or not g_fast[name].any(), f"{name}: gradient where nextrec has none"
    assert_as_accurate(g_fast, [g_plain, g_flipped, g_moved], g_truth)


# -- nextrec 0.6 random configurations ------------------------------------------------------
V06_ACTIVATIONS = ("relu", "tanh", "silu", "mish", "sigmoid", "gelu", "leaky_relu", "elu", "linear")


def random_v06_features(rng: random.Random, feature_module=None):
    """Random 0.6 features: nextrec 0.6's, or ``feature_module``'s (``nextrec_fast.features.v06``)."""
    if feature_module is None:
        from nextrec.basic import features as feature_module
    DenseFeature, SequenceFeature, SparseFeature = (feature_module.DenseFeature, feature_module.SequenceFeature,
                                                    feature_module.SparseFeature)
    sparse, sequence, dense, tables = [], [], [], []
    for i in range(rng.randint(1, 4)):
        if tables and rng.random() < 0.3:
            name, vocab, dim = rng.choice(tables)
            sparse.append(SparseFeature(f"sp{i}", vocab, embedding_name=name, embedding_dim=dim))
            continue
        vocab, dim = rng.randint(3, 40), rng.choice([2, 4, 8])
        kwargs = dict(embedding_dim=dim, padding_idx=rng.choice([0, 0, rng.randrange(vocab)]))
        if rng.random() < 0.2:  # pretrained, sometimes frozen
            # from the draw's own generator: a global one would make the model depend on what ran before
            table = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            kwargs.update(pretrained_weight=table, trainable=rng.random() < 0.5)
        sparse.append(SparseFeature(f"sp{i}", vocab, **kwargs))
        tables.append((f"sp{i}", vocab, dim))
    for i in range(rng.randint(0, 3)):
        combiner = rng.choice(["mean", "sum", "concat", "dot_attention", "self_attention"])
        max_len = rng.randint(1, 5)
        dims = [d for _, _, d in tables if d % 4 == 0] if combiner == "self_attention" else None
        if tables and rng.random() < 0.3 and (dims is None or dims):
            name, vocab, dim = rng.choice([t for t in tables if dims is None or t[2] % 4 == 0])
            sequence.append(SequenceFeature(f"seq{i}", vocab, max_len=max_len, embedding_name=name, embedding_dim=dim,
                                            combiner=combiner, padding_idx=rng.choice([0, rng.randrange(vocab)])))
            continue
        vocab = rng.randint(3, 40)
        dim = rng.choice([4, 8]) if combiner == "self_attention" else rng.choice([2, 4, 8])
        sequence.append(SequenceFeature(f"seq{i}", vocab, max_len=max_len, embedding_dim=dim, combiner=combiner,
                                        padding_idx=rng.choice([0, rng.randrange(vocab)])))
        tables.append((f"seq{i}", vocab, dim))
    for i in range(rng.randint(0, 3)):
        kind = rng.choice(["plain", "linear", "mlp"])
        input_dim = rng.randint(1, 3)
        if kind == "plain":
            dense.append(DenseFeature(f"d{i}", input_dim=input_dim))
        elif kind == "linear":
            dense.append(DenseFeature(f"d{i}", input_dim=input_dim, proj_dim=rng.randint(2, 4)))
        else:
            dense.append(DenseFeature(f"d{i}", input_dim=input_dim, proj_dim=rng.randint(1, 4), projection_type="mlp",
                                      mlp_hidden_dims=[rng.randint(1, 5)], mlp_activation=rng.choice(V06_ACTIVATIONS)))
    return dense, sparse, sequence


def random_v06_mlp(rng: random.Random, norm_type: str | None = None, tower: bool = False, layers: int = 2) -> dict:
    params = {"hidden_dims": [rng.randint(2, 7) for _ in range(rng.randint(1, layers))],
              "activation": rng.choice(V06_ACTIVATIONS),
              "norm_type": norm_type or rng.choice(["none", "batch_norm", "layer_norm"])}
    if tower and rng.random() < 0.3:
        params["output_activation"] = rng.choice(["tanh", "sigmoid", "relu"])
    return params


def random_v06_model(kind: str, seed: int, norm_type: str | None = None, classes: dict | None = None,
                     feature_module=None, **extra):
    """A random 0.6 ESMM / MMOE / PLE and its features, a function of ``seed`` alone (built under
    ``torch.manual_seed(seed)``; pretrained tables from a generator seeded by the draw), so two
    builds are identical and a printed seed replays it; ``classes`` ({kind: class}) builds the
    same configuration with another class, ``feature_module`` with other feature classes (both:
    without nextrec)."""
    classes = classes or {}
    if kind not in classes:
        from nextrec.models.multitask.esmm import ESMM
        from nextrec.models.multitask.mmoe import MMOE
        from nextrec.models.multitask.ple import PLE
        classes = {"esmm": ESMM, "mmoe": MMOE, "ple": PLE, **classes}
    ESMM, MMOE, PLE = (classes.get(k) for k in ("esmm", "mmoe", "ple"))
    rng = random.Random(seed)
    feats = random_v06_features(rng, feature_module)
    tasks = rng.randint(1, 3) if kind != "esmm" else 2
    target = [f"t{i}" for i in range(tasks)]
    torch.manual_seed(seed)
    if kind == "esmm":
        return ESMM(*feats, ctr_mlp_params=random_v06_mlp(rng, norm_type, layers=3),
                    cvr_mlp_params=random_v06_mlp(rng, norm_type, layers=3), target=target, **extra), feats
    towers = [random_v06_mlp(rng, norm_type, tower=True) for _ in range(tasks)]
    if kind == "mmoe":
        return MMOE(*feats, expert_mlp_params=random_v06_mlp(rng, norm_type), num_experts=rng.randint(1, 6),
                    tower_mlp_params_list=towers, target=target, **extra), feats
    shared = random_v06_mlp(rng, norm_type)
    specific = [dict(shared) if rng.random() < 0.6 else {**random_v06_mlp(rng, norm_type),
                                                         "hidden_dims": shared["hidden_dims"][-1:]}
                for _ in range(tasks)]
    return PLE(*feats, shared_expert_mlp_params=shared, specific_expert_mlp_params=specific,
               num_shared_experts=rng.randint(1, 3), num_specific_experts=rng.randint(1, 2),
               num_levels=rng.randint(1, 3), tower_mlp_params_list=towers, target=target, **extra), feats


def random_v06_inputs(feats, batch: int, generator: torch.Generator) -> dict:
    """A batch as 0.6's data loader gives it: ids [B] / [B, L] (some rows all padding), dense [B] or [B, k]."""
    dense, sparse, sequence = feats
    x = {}
    for f in sparse:
        x[f.name] = torch.randint(0, f.vocab_size, (batch,), generator=generator)
    for f in sequence:
        length = f.max_len + int(torch.randint(0, 3, (1,), generator=generator))
        ids = torch.randint(0, f.vocab_size, (batch, length), generator=generator)
        ids[torch.rand(batch, length, generator=generator) < 0.4] = f.padding_idx
        if f.combiner == "self_attention":  # all-padding rows give NaN in nextrec's self-attention pooling
            ids[:, -1] = torch.where(ids[:, -1] == f.padding_idx, (f.padding_idx + 1) % f.vocab_size, ids[:, -1])
        else:
            ids[0, -f.max_len:] = f.padding_idx  # an all-padding row (after truncation)
        x[f.name] = ids
    for f in dense:
        shape = (batch,) if f.input_dim == 1 else (batch, f.input_dim)
        x[f.name] = torch.randn(*shape, generator=generator)
    return x


def run_doc_examples(relative_path: str, must_contain: str) -> dict:
    """Runs, in one namespace, the ```python blocks of a document of the source tree (README.md,
    docs/...) from the first one containing ``must_contain`` to the end of that section (the next
    ``## `` heading): the user's copy-and-paste. Skips when the document is not beside the tests
    (tests installed without the source tree)."""
    import pathlib
    import re
    import pytest
    doc = pathlib.Path(__file__).resolve().parents[1] / relative_path
    if not doc.exists():
        pytest.skip(f"{relative_path} is not beside the tests (installed tests without the source tree)")
    text = doc.read_text()
    start = text.find(must_contain)
    assert start >= 0, f"{relative_path} no longer contains {must_contain!r}"
    start = text.rfind("```python\n", 0, start)
    end = text.find("\n## ", start)
    section = text[start:end if end >= 0 else len(text)]
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        exec(compile(block, relative_path, "exec"), namespace)
    return namespace
