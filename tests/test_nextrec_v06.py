"""accelerate / restore / patch_nextrec and nextrec's own fit on nextrec 0.6.x, against float64 nextrec.

Random configurations across the options 0.6 offers for ESMM / MMOE / PLE: norm_type none /
batch_norm / layer_norm, output activations, dense projections (linear, mlp), pretrained and
frozen tables, shared tables, sequence combiners mean / sum / concat / dot_attention /
self_attention. Seeds are fresh each run and printed; NEXTREC_FAST_TEST_SEED replays a run.
"""
from __future__ import annotations

import copy
import os
import pickle
import random
import time

import numpy as np
import pytest
import torch

import nextrec_fast
from nextrec_generation import (assert_as_accurate, assert_predicts_as_plain, assert_regularized_grads_as_accurate,
                                JITTERED, case_seed, flip_rows, jittered_by_one_ulp, moved_by_one_ulp,
                                nextrec_float64, predict_proba, random_v06_inputs, random_v06_model, require,
                                skip_if_rows_collapse)

require("0.6")
from nextrec.basic.layers import EmbeddingLayer  # noqa: E402
from nextrec.models.multitask.esmm import ESMM  # noqa: E402
from nextrec.models.multitask.mmoe import MMOE  # noqa: E402
from nextrec.models.multitask.ple import PLE  # noqa: E402

pytestmark = pytest.mark.nextrec
CLASSES = {"esmm": ESMM, "mmoe": MMOE, "ple": PLE}
RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec writes a session folder into the working directory


def _seed(*parts) -> int:
    return case_seed(RUN_SEED, *parts)  # RUN_SEED looked up at call time (stress runs set it)


def _grads(model, x, flipped: bool = False):
    model.zero_grad(set_to_none=True)
    out = predict_proba(model, flip_rows(x)).flip(0) if flipped else predict_proba(model, x)
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm_type", ["none", "batch_norm", "layer_norm", None])
@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_accelerate_matches_float64_nextrec(kind, norm_type, mode):
    """Outputs (after the head, as nextrec's training loop sees them) and every gradient."""
    seed = _seed(kind, norm_type, mode)
    model, feats = random_v06_model(kind, seed, norm_type=norm_type)
    plain, plain_flipped = copy.deepcopy(model), copy.deepcopy(model)  # the second's BatchNorm stats are its own
    plain_moved = moved_by_one_ulp(model)
    plain_jittered = [jittered_by_one_ulp(model, seed + j) for j in range(JITTERED)]
    truth = copy.deepcopy(model).double()
    params_before, keys_before = [id(p) for p in model.parameters()], list(model.state_dict())
    assert nextrec_fast.accelerate(model) is model
    assert isinstance(model, CLASSES[kind]) and isinstance(model.embedding, EmbeddingLayer)
    assert nextrec_fast.is_accelerated(model)
    assert [id(p) for p in model.parameters()] == params_before and list(model.state_dict()) == keys_before
    x = random_v06_inputs(feats, batch=random.Random(seed).randint(2, 24), generator=torch.Generator().manual_seed(seed))
    for m in (model, plain, plain_flipped, plain_moved, truth, *plain_jittered):
        m.train(mode == "train")
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    with nextrec_float64():
        skip_if_rows_collapse(truth, lambda m: predict_proba(m, x64), mode)
    out_nr, g_nr = _grads(plain, x)
    # float32 rounding's spread: plain runs with the rows reversed, the weights moved by one ulp,
    # and JITTERED with each weight moved by -1, 0 or +1 ulp (a narrow LayerNorm is blind to a
    # uniform move; nextrec_generation.jittered_by_one_ulp)
    out_nr_flipped, g_nr_flipped = _grads(plain_flipped, x, flipped=True)
    out_nr_moved, g_nr_moved = _grads(plain_moved, x)
    jittered_runs = [_grads(m, x) for m in plain_jittered]
    out_fast, g_fast = _grads(model, x)
    with nextrec_float64():
        out_truth, g_truth = _grads(truth, x64)
    if mode == "eval":  # no batch statistics: the same function to float32 rounding
        torch.testing.assert_close(out_fast, out_nr, rtol=1e-5, atol=1e-6)
    outs = [out_nr, out_nr_flipped, out_nr_moved] + [o for o, _ in jittered_runs]
    assert_as_accurate({"output": out_fast}, [{"output": o} for o in outs], {"output": out_truth}, what="output")
    for name, g in g_nr.items():
        if g is None:
            assert g_fast[name] is None or not g_fast[name].any(), name
    # as close to float64 as nextrec's float32
    assert_as_accurate(g_fast, [g_nr, g_nr_flipped, g_nr_moved] + [g for _, g in jittered_runs], g_truth)
    # the state after the step (BatchNorm's running statistics) too, judged the same way: a fixed
    # rtol 1e-4 / atol 1e-5 against float32 nextrec came within 0.55 of failing in 10 draws
    states = [dict(m.state_dict()) for m in (model, plain, plain_flipped, plain_moved, truth)]
    assert list(states[0]) == list(states[1])
    for name, b_nr in states[1].items():
        if not b_nr.is_floating_point():
            assert torch.equal(states[0][name], b_nr), name
    floating = [{n: b for n, b in st.items() if b.is_floating_point()} for st in states]
    assert_as_accurate(floating[0], floating[1:4], floating[4], what="state")
    assert nextrec_fast.restore(model) is model
    assert type(model) is CLASSES[kind] and type(model.embedding) is EmbeddingLayer
    assert not nextrec_fast.is_accelerated(model)


def test_relu_experts_without_norm_take_the_bias_act_path(monkeypatch):
    """0.6's default MLP (no norm) with ReLU, accelerated, float64: every expert and tower layer's
    bias and ReLU run through ``batch_norm_act.bias_act`` (one pass, expert-major between layers,
    batch-major after the last), and the outputs, every gradient, and forward-mode AD's output
    tangent (there the model runs nextrec's own forward: tests/test_autograd_modes.py) equal
    nextrec's."""
    import torch.autograd.forward_ad as fwad
    from nextrec.models.multitask.mmoe import MMOE
    from nextrec_fast.ops import batch_norm_act
    calls = []
    real = batch_norm_act.bias_act
    monkeypatch.setattr(batch_norm_act, "bias_act",
                        lambda x, **kw: calls.append((kw["experts"], kw["relu"], kw["out_expert_major"])) or real(x, **kw))
    seed = _seed("bias_act")
    _, feats = random_v06_model("mmoe", seed, norm_type="none")
    mlp = {"hidden_dims": [6, 4], "activation": "relu", "norm_type": "none"}
    torch.manual_seed(seed)
    plain = MMOE(*feats, expert_mlp_params=mlp, num_experts=3, tower_mlp_params_list=[mlp, mlp],
                 target=["t0", "t1"]).double()
    model = nextrec_fast.accelerate(copy.deepcopy(plain))
    x = random_v06_inputs(feats, batch=7, generator=torch.Generator().manual_seed(seed))
    x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    with nextrec_float64():
        out_plain, g_plain = _grads(plain, x)
        out_fast, g_fast = _grads(model, x)
        tangents = []
        for m in (plain, model):
            with fwad.dual_level():
                weight = dict(m.named_parameters())["experts.0.mlp.0.weight"]
                dual = {"experts.0.mlp.0.weight": fwad.make_dual(weight.detach(), torch.ones_like(weight))}
                out = torch.func.functional_call(m, dual, (x,))
                out = torch.cat(out, 1) if isinstance(out, (list, tuple)) else out
                tangents.append(fwad.unpack_dual(out).tangent)
    # The 3 experts' two layers, then the 2 towers' two hidden layers and their output layer (no activation).
    assert calls == [(3, True, True), (3, True, False), (2, True, True), (2, True, True), (2, False, False)], calls
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-12, atol=1e-14)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_fast[name], g, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m} (seed {seed})")
    torch.testing.assert_close(tangents[1], tangents[0], rtol=1e-10, atol=1e-13)


def test_accelerate_is_atomic():
    """A model the fast path cannot take (here: a gate that is not Linear + Softmax) is left
    exactly as it was, and the error says what is unsupported."""
    model, _ = random_v06_model("mmoe", _seed("atomic"))
    model.gates[0] = torch.nn.Sequential(torch.nn.Linear(model.gates[0][0].in_features, model.num_experts),
                                         torch.nn.Sigmoid())
    classes, state = (type(model), type(model.embedding)), copy.deepcopy(model.state_dict())
    attrs, embedding_attrs = set(vars(model)), set(vars(model.embedding))
    with pytest.raises(nextrec_fast.compat.UnsupportedModelError, match="gate must be"):
        nextrec_fast.accelerate(model)
    assert (type(model), type(model.embedding)) == classes and not nextrec_fast.is_accelerated(model)
    assert set(vars(model)) == attrs and set(vars(model.embedding)) == embedding_attrs
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unsupported_model_error_names_both_generations():
    with pytest.raises(TypeError, match="multitask.mmoe.MMOE.*multi_task.mmoe.MMOE"):
        nextrec_fast.accelerate(torch.nn.Linear(2, 2))


def test_squeezed_and_raw_layouts_use_nextrec():
    """The embedding layer's other layouts (not used by these models) give nextrec's results."""
    model, feats = random_v06_model("mmoe", _seed("layouts"))
    plain = copy.deepcopy(model)
    nextrec_fast.accelerate(model)
    x = random_v06_inputs(feats, batch=5, generator=torch.Generator().manual_seed(1))
    dims = {f.embedding_dim for f in feats[1] + feats[2]}
    with torch.no_grad():
        for kwargs in ({"squeeze_dim": True}, {"squeeze_dim": False} if len(dims) == 1 and not feats[0] else None):
            if kwargs is None:
                continue
            try:
                expected = plain.embedding(x, plain.all_features, **kwargs)
            except (RuntimeError, ValueError) as error:
                # nextrec's own error (seen: squeeze_dim=False with a "concat" sequence, whose
                # [B, L*D] does not stack with [B, D]; NEXTREC_FAST_TEST_SEED=27000): ours too
                with pytest.raises(type(error)):
                    model.embedding(x, model.all_features, **kwargs)
                continue
            torch.testing.assert_close(model.embedding(x, model.all_features, **kwargs), expected)


def test_patch_and_unpatch():
    try:
        nextrec_fast.patch_nextrec()
        nextrec_fast.patch_nextrec()  # idempotent
        patched, _ = random_v06_model("ple", _seed("patch"))
        assert nextrec_fast.is_accelerated(patched)
    finally:
        nextrec_fast.unpatch_nextrec()
    plain, _ = random_v06_model("ple", _seed("patch"))
    assert not nextrec_fast.is_accelerated(plain) and type(plain) is PLE


def test_pickles_accelerated():
    model, feats = random_v06_model("esmm", _seed("pickle"))
    nextrec_fast.accelerate(model)
    clone = pickle.loads(pickle.dumps(model))  # more copies: test_copies.py
    assert isinstance(clone, ESMM) and isinstance(clone.embedding, EmbeddingLayer)
    assert nextrec_fast.is_accelerated(clone)
    x = random_v06_inputs(feats, batch=4, generator=torch.Generator().manual_seed(2))
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(predict_proba(clone, x), predict_proba(model, x))


def test_regularization_gradient_matches_nextrec():
    model, feats = random_v06_model("mmoe", _seed("reg"), embedding_l1_reg=1e-3, dense_l1_reg=1e-3,
                                    embedding_l2_reg=1e-2, dense_l2_reg=1e-2)
    plain = copy.deepcopy(model)
    nextrec_fast.accelerate(model)
    x = random_v06_inputs(feats, batch=8, generator=torch.Generator().manual_seed(3))
    assert_regularized_grads_as_accurate(plain, model, x)


# -- nextrec's own fit ---------------------------------------------------------------------
def _frame(feats, n, targets, seed):
    dense, sparse, sequence = feats
    rng = np.random.default_rng(seed)
    data = {f.name: rng.integers(0, f.vocab_size, n) for f in sparse}
    for f in sequence:
        ids = rng.integers(0, f.vocab_size, (n, f.max_len))
        ids[rng.random((n, f.max_len)) < 0.4] = f.padding_idx
        ids[:, -1] = np.where(ids[:, -1] == f.padding_idx, (f.padding_idx + 1) % f.vocab_size, ids[:, -1])
        data[f.name] = ids
    for f in dense:
        data[f.name] = rng.standard_normal((n,) if f.input_dim == 1 else (n, f.input_dim)).astype(np.float32)
    for t in targets:
        data[t] = rng.integers(0, 2, n).astype(np.float32)
    return data


@pytest.mark.parametrize("shuffle", [True, False])
def test_fast_data_path_gives_nextrec_batches(shuffle):
    model, feats = random_v06_model("mmoe", _seed("data", shuffle))
    plain = copy.deepcopy(model)
    nextrec_fast.accelerate(model)
    data = _frame(feats, 50, model.target_columns, 4)
    data["uid"] = np.arange(50) * 7
    batches = []
    for m in (plain, model):
        torch.manual_seed(123)
        loader = m.prepare_data_loader(data, batch_size=16, shuffle=shuffle, key_columns=["uid"])
        assert loader.batch_size == 16 and len(loader) == 4  # what nextrec's training summary prints
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 4
    for b_plain, b_fast in zip(*batches):
        assert b_plain.keys() == b_fast.keys() and b_plain["schema"] == b_fast["schema"]
        for section in ("features", "labels"):
            assert b_plain[section].keys() == b_fast[section].keys()
            for name in b_plain[section]:
                assert torch.equal(b_plain[section][name], b_fast[section][name]), (section, name)
        assert [str(k) for k in b_plain["keys"]["uid"]] == [str(k) for k in b_fast["keys"]["uid"]]


def _fit_predictions(model, data, targets, epochs=2, **compile_kwargs):
    model.compile(optimizer="sgd", optimizer_params={"lr": 0.05}, loss="bce", **compile_kwargs)
    torch.manual_seed(0)  # the same shuffling for every run
    model.fit(data, epochs=epochs, batch_size=32, shuffle=True, metrics=["auc"], use_tensorboard=False)
    return np.asarray(model.predict(data, batch_size=64, return_dataframe=False), dtype=float)


@pytest.mark.parametrize("norm_type", ["none", "batch_norm"])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_fit_plain_vs_accelerated(kind, norm_type):
    """Two epochs of 0.6's own fit loop (regularisation, gradient clipping, SGD), plain and
    accelerated from the same weights and batches: the same predictions, to float32 rounding as
    training carries it (measured by a third plain run from weights moved by one ulp). With
    BatchNorm MLPs also the running statistics the predictions use.

    The tables are redrawn at unit scale. nextrec initialises them at ~1e-4 and adds each Linear's
    bias before BatchNorm, so with a tiny vocabulary the batch variation of a BatchNorm input
    is ~1e-4 of the bias it rides on, and float32 loses it: seed 47386819 (a 4-id feature),
    plain's first outputs were 9.6e-5 off float64, the fast path's (which folds the bias into
    the normalisation) 1.6e-7. That error is plain's own and systematic, so moving plain's
    weights by an ulp does not show it, and after two epochs fast and plain were 5.2e-3 apart
    against 5e-5 for the moved run. Unit-scale tables keep the draw as well conditioned as
    training data makes it."""
    seed = _seed("fit", kind, norm_type)
    model, feats = random_v06_model(kind, seed, norm_type=norm_type, dense_l2_reg=1e-3, embedding_l2_reg=1e-4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in model.embedding.embed_dict.values():
            table.weight.copy_(torch.randn(table.weight.shape, generator=gen))
    for module in model.modules():  # smooth activations: no kinks for rounding to cross
        for i, child in list(module.named_children()):
            if isinstance(child, (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ELU)):
                setattr(module, i, torch.nn.Tanh())
    plain, rounded = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.mul_(1 + 2**-23)
    nextrec_fast.accelerate(model)
    data = _frame(feats, 96, model.target_columns, seed)
    preds = [_fit_predictions(m, data, model.target_columns) for m in (plain, model, rounded)]
    carried = np.abs(preds[2] - preds[0]).max()
    np.testing.assert_allclose(preds[1], preds[0], rtol=1e-3, atol=max(5e-5, 4 * carried))


def test_grad_norm_runs_nextrecs_forward():
    """GradNorm differentiates the task losses' gradients again: under it the accelerated model
    trains with nextrec's own forward (same predictions as plain, no error)."""
    rng = random.Random(_seed("gradnorm"))
    while True:  # GradNorm needs two tasks; nextrec's self-attention pooling has no double backward on CPU
        model, feats = random_v06_model("mmoe", rng.randrange(2**31), norm_type="none")
        if model.nums_task >= 2 and all(f.combiner != "self_attention" for f in feats[2]):
            break
    plain = copy.deepcopy(model)
    nextrec_fast.accelerate(model)
    data = _frame(feats, 64, model.target_columns, 5)
    preds = [_fit_predictions(m, data, model.target_columns, epochs=1, loss_weights={"method": "grad_norm"})
             for m in (plain, model)]
    np.testing.assert_allclose(preds[1], preds[0], rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    """save_model of an accelerated model loads into plain nextrec (and back), strict."""
    model, feats = random_v06_model("ple", _seed("ckpt"))
    nextrec_fast.accelerate(model)
    path = model.save_model(tmp_path / "ple", verbose=False)
    plain, _ = random_v06_model("ple", _seed("ckpt"))
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    plain.load_state_dict(torch.load(path), strict=True)
    x = random_v06_inputs(feats, batch=6, generator=torch.Generator().manual_seed(6))
    model.eval()
    plain.eval()
    assert_predicts_as_plain(model, plain, x)


# -- drop-in models ------------------------------------------------------------------------
def test_drop_ins_are_nextrecs_classes_accelerated():
    """``from nextrec_fast import MMOE`` under 0.6: nextrec 0.6's class (its signature, ``fit``,
    ...), accelerated when built; a plain 0.6 checkpoint loads strictly and gives nextrec's
    outputs (logits from forward, probabilities from call_model)."""
    import inspect

    from nextrec_fast.models import v06
    assert (nextrec_fast.ESMM, nextrec_fast.MMOE, nextrec_fast.PLE) == (v06.ESMM, v06.MMOE, v06.PLE)
    assert inspect.signature(v06.MMOE) == inspect.signature(MMOE)
    assert "expert_mlp_params" in inspect.signature(v06.MMOE).parameters
    for kind, cls in (("esmm", v06.ESMM), ("mmoe", v06.MMOE), ("ple", v06.PLE)):
        seed = _seed("drop-in", kind)
        plain, feats = random_v06_model(kind, seed)
        drop_in, _ = random_v06_model(kind, seed, classes={kind: cls})
        assert isinstance(drop_in, cls) and isinstance(drop_in, CLASSES[kind])
        assert nextrec_fast.is_accelerated(drop_in)
        assert all(callable(getattr(drop_in, name, None)) for name in
                   ("compile", "fit", "predict", "evaluate", "save_model", "load_model", "call_model"))
        drop_in.load_state_dict(plain.state_dict(), strict=True)
        x = random_v06_inputs(feats, batch=7, generator=torch.Generator().manual_seed(seed))
        plain.eval()
        drop_in.eval()
        assert_predicts_as_plain(drop_in, plain, x, forward=lambda m, x: m(x), what=f"{kind} logits")
        assert_predicts_as_plain(drop_in, plain, x, what=f"{kind} probabilities")


def test_onnx_export_runs_nextrecs_forward(tmp_path):
    """nextrec 0.6's own export_onnx on an accelerated model: our ops are not ONNX ops, so the
    export traces nextrec's forward; the graph is the one plain nextrec exports."""
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (CI installs onnx and onnxscript)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (CI installs it)")
    model, _ = random_v06_model("mmoe", _seed("onnx"), norm_type="batch_norm")
    plain = copy.deepcopy(model)
    nextrec_fast.accelerate(model)
    graphs = []
    for name, m in (("plain", plain), ("fast", model)):
        path = m.export_onnx(save_path=str(tmp_path / f"{name}.onnx"))
        graph = onnx.load(str(path)).graph
        graphs.append(sorted((node.domain, node.op_type) for node in graph.node))
    assert graphs[0] == graphs[1]
    assert not any(domain for domain, _ in graphs[1])  # standard ONNX ops only, none of ours
    assert nextrec_fast.is_accelerated(model)


def test_readme_example_runs():
    """The README's accelerate example and its fit, as printed, on nextrec 0.6."""
    from nextrec_generation import run_doc_examples
    namespace = run_doc_examples("README.md", "from nextrec.models.multitask.mmoe import MMOE")
    assert namespace["probs"].shape == (8, 2) and nextrec_fast.is_accelerated(namespace["model"])
