"""The plain-module drop-ins with nextrec 0.6's API (``nextrec_fast.models.standalone_v06``) and the
0.6 oracle they are built on (``nextrec_fast.reference.v06``).

- With nextrec 0.6 installed: the reference *is* nextrec 0.6 (same weights under the same seed,
  same ``state_dict`` keys in the same order, bit-identical outputs and gradients), and nextrec
  0.6 checkpoints load into the drop-ins with ``strict=True``.
- Everywhere (no nextrec needed): the drop-ins against the float64 reference, forward (logits,
  head, ESMM's adapter) and every gradient, on fresh random configurations across 0.6's options
  (norm types, output activations, dense projections, pretrained and frozen tables, shared
  tables, every sequence combiner); clear errors for 0.3.1's arguments and features.
Seeds are fresh each run and printed; NEXTREC_FAST_TEST_SEED replays a run.
"""
from __future__ import annotations

import copy
import os
import random
import time

import pytest
import torch

import nextrec_fast
from nextrec_fast.features import v06 as features_v06
from nextrec_fast.models import standalone_v06
from nextrec_fast.reference import v06 as reference_v06
from nextrec_generation import (GENERATION, JITTERED, assert_as_accurate, assert_predicts_as_plain, case_seed,
                                flip_rows, jittered_by_one_ulp, moved_by_one_ulp, nextrec_float64, predict_proba,
                                random_v06_inputs, random_v06_model, skip_if_rows_collapse)

RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))
KINDS = ["esmm", "mmoe", "ple"]
REFERENCE = {"esmm": reference_v06.ESMM, "mmoe": reference_v06.MMOE, "ple": reference_v06.PLE}
DROP_IN = {"esmm": standalone_v06.ESMM, "mmoe": standalone_v06.MMOE, "ple": standalone_v06.PLE}
needs_nextrec06 = pytest.mark.skipif(GENERATION != "0.6", reason="compares with nextrec 0.6, which is not installed "
                                     "(CI runs it in the 0.6 environment)")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nextrec 0.6 writes a session folder into the working directory


def _seed(*parts) -> int:
    return case_seed(RUN_SEED, *parts)  # RUN_SEED looked up at call time (stress runs set it)


def _build(kind, seed, cls, feature_module=None, norm_type=None):
    return random_v06_model(kind, seed, norm_type=norm_type, classes={kind: cls} if cls else None,
                            feature_module=feature_module)


def _outputs_and_grads(model, x, flipped: bool = False):
    """(forward logits, what predict scores, {name: grad}) after one weighted backward; with
    ``flipped``, computed on the rows in reverse order and flipped back (the same loss)."""
    model.zero_grad(set_to_none=True)
    if flipped:
        logits, scored = model(flip_rows(x)).flip(0), predict_proba(model, flip_rows(x)).flip(0)
    else:
        logits, scored = model(x), predict_proba(model, x)
    weights = torch.linspace(0.5, 1.5, scored.numel(), dtype=scored.dtype).view_as(scored)
    ((scored * weights).sum() + logits.sum() * 0.1).backward()
    return logits.detach(), scored.detach(), {n: p.grad for n, p in model.named_parameters()}


@needs_nextrec06
@pytest.mark.nextrec
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reference_is_nextrec_06(kind, mode):
    """Same seed, same weights; same keys in the same order; bit-identical outputs and gradients."""
    from nextrec.basic.features import SparseFeature
    for draw in range(4):
        seed = _seed(kind, mode, draw)
        plain, feats = _build(kind, seed, None)
        ours, _ = _build(kind, seed, REFERENCE[kind])
        assert list(ours.state_dict()) == list(plain.state_dict())
        for (name, a), b in zip(plain.state_dict().items(), ours.state_dict().values()):
            assert torch.equal(a, b), name
        assert [n for n, _ in ours.named_modules()] == [n for n, _ in plain.named_modules()]
        assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in plain.parameters()]
        assert ours.nums_task == plain.nums_task and ours.task == plain.task
        assert [id(p) for p in ours.embedding_params] != []  # registered, as nextrec's
        assert len(ours.regularization_weights) == len(plain.regularization_weights)
        x = random_v06_inputs(feats, batch=random.Random(seed).randint(2, 16), generator=torch.Generator().manual_seed(seed))
        plain.train(mode == "train")
        ours.train(mode == "train")
        out_plain = _outputs_and_grads(plain, x)
        out_ours = _outputs_and_grads(ours, x)
        assert torch.equal(out_ours[0], out_plain[0]) and torch.equal(out_ours[1], out_plain[1])
        for name, g in out_plain[2].items():
            assert (g is None) == (out_ours[2][name] is None) and (g is None or torch.equal(g, out_ours[2][name])), name
    assert isinstance(feats[1][0], SparseFeature)  # nextrec's own features were used


@needs_nextrec06
@pytest.mark.nextrec
@pytest.mark.parametrize("kind", KINDS)
def test_nextrec_06_checkpoint_loads_strictly(kind, tmp_path):
    """A 0.6 model's state (as ``save_model`` writes it: the state_dict) loads into a drop-in of
    the same configuration with other weights, with ``strict=True``, and it then predicts what
    nextrec predicts."""
    seed = _seed(kind, "checkpoint")
    plain, feats = _build(kind, seed, None)
    drop_in, _ = _build(kind, seed, DROP_IN[kind])
    with torch.no_grad():
        for p in drop_in.parameters():
            p.add_(torch.randn_like(p))
    torch.save(plain.state_dict(), tmp_path / "model.pt")
    drop_in.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    x = random_v06_inputs(feats, batch=9, generator=torch.Generator().manual_seed(seed))
    plain.eval()
    drop_in.eval()
    assert_predicts_as_plain(drop_in, plain, x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm_type", ["none", "batch_norm", "layer_norm", None])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_drop_in_matches_float64_reference(kind, norm_type, mode):
    """Logits, head probabilities and every gradient of the fast drop-in are as close to the
    float64 reference as the float32 reference is (no nextrec needed)."""
    seed = _seed(kind, norm_type, mode)
    fast, feats = _build(kind, seed, DROP_IN[kind], features_v06, norm_type)
    plain, _ = _build(kind, seed, REFERENCE[kind], features_v06, norm_type)
    truth, moved = copy.deepcopy(plain).double(), moved_by_one_ulp(plain)
    jittered = [jittered_by_one_ulp(plain, seed + j) for j in range(JITTERED)]
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast.load_state_dict(plain.state_dict())
    x = random_v06_inputs(feats, batch=random.Random(seed).randint(2, 24), generator=torch.Generator().manual_seed(seed))
    for m in (fast, plain, moved, truth, *jittered):
        m.train(mode == "train")
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    with nextrec_float64():
        skip_if_rows_collapse(truth, lambda m: m(x64), mode)
    got, ref = _outputs_and_grads(fast, x), _outputs_and_grads(plain, x)
    # float32 rounding's spread: plain runs with the rows reversed, the weights moved by one ulp,
    # and JITTERED with each weight moved by -1, 0 or +1 ulp (a narrow LayerNorm is blind to a
    # uniform move; nextrec_generation.jittered_by_one_ulp)
    refs = [ref, _outputs_and_grads(plain, x, flipped=True), _outputs_and_grads(moved, x)]
    refs += [_outputs_and_grads(m, x) for m in jittered]
    with nextrec_float64():
        true = _outputs_and_grads(truth, x64)
    for what, i in (("logits", 0), ("probabilities", 1)):
        assert_as_accurate({what: got[i]}, [{what: r[i]} for r in refs], {what: true[i]}, what="output")
    for name, g in ref[2].items():
        if g is None:
            assert got[2][name] is None or not got[2][name].any(), name
    assert_as_accurate(got[2], [r[2] for r in refs], true[2])


def test_drop_in_runs_the_fast_path():
    """The drop-in pools through the fast embedding layer and batches its experts (the fast
    forward, not the reference's loops)."""
    from model_pairs import count_batched_banks
    for kind in KINDS:
        model, feats = _build(kind, _seed("fast path", kind), DROP_IN[kind], features_v06, "batch_norm")
        assert isinstance(model.embedding, standalone_v06.FastEmbeddingLayer)
        assert isinstance(model.embedding, reference_v06.EmbeddingLayer)
        with count_batched_banks() as counts:
            model.eval()(random_v06_inputs(feats, batch=4, generator=torch.Generator().manual_seed(0)))
        assert counts["banks"] > 0, f"{kind}: the fast forward did not run"


def test_errors_name_the_0_6_spelling():
    sparse = [features_v06.SparseFeature("u", 10, embedding_dim=4)]
    with pytest.raises(TypeError, match="expert_mlp_params"):
        standalone_v06.MMOE([], sparse, [], expert_params={"hidden_dims": [4]}, tower_mlp_params_list=[{}],
                            target=["y"])
    with pytest.raises(TypeError, match="hidden_dims"):
        standalone_v06.MMOE([], sparse, [], expert_mlp_params={"dims": [4]}, tower_mlp_params_list=[{}], target=["y"])
    with pytest.raises(TypeError, match="features.v06"):
        standalone_v06.ESMM([nextrec_fast.features.DenseFeature("d", embedding_dim=3)], sparse, [],
                            ctr_mlp_params={}, cvr_mlp_params={})
    with pytest.raises(ValueError, match="task has 1 entry but target has 2"):
        standalone_v06.MMOE([], sparse, [], expert_mlp_params={}, tower_mlp_params_list=[{}, {}], target=["a", "b"],
                            task="binary")
    with pytest.raises(ValueError, match="pointwise"):
        standalone_v06.PLE([], sparse, [], specific_expert_mlp_params=[{}], tower_mlp_params_list=[{}], target=["y"],
                           training_mode="pairwise")
    with pytest.raises(ValueError, match="Unsupported task_type|unsupported tasks"):
        standalone_v06.MMOE([], sparse, [], expert_mlp_params={}, tower_mlp_params_list=[{}], target=["y"],
                            task=["multiclass"])
    with pytest.raises(TypeError, match="0.3-style"):  # 0.3.1's SparseFeature (l1_reg / l2_reg) too
        standalone_v06.MMOE([], [nextrec_fast.features.SparseFeature("u", 10)], [], expert_mlp_params={},
                            tower_mlp_params_list=[{}], target=["y"])
    with pytest.raises(TypeError, match="proj_dim"):
        features_v06.DenseFeature("d", embedding_dim=8)
    with pytest.raises(TypeError, match="embedding_l2_reg"):
        features_v06.SparseFeature("u", 10, l2_reg=1e-5)
    with pytest.raises(TypeError, match="ctr_mlp_params"):
        standalone_v06.ESMM([], sparse, [], ctr_params={"hidden_dims": [4]}, cvr_mlp_params={})
    with pytest.raises(TypeError, match="specific_expert_mlp_params"):
        standalone_v06.PLE([], sparse, [], specific_expert_params={}, tower_mlp_params_list=[{}], target=["y"])
    with pytest.raises(TypeError, match=r"tower_mlp_params_list has unknown MLP argument\(s\) \['norm'\]"):
        standalone_v06.MMOE([], sparse, [], expert_mlp_params={}, tower_mlp_params_list=[{"norm": "x"}], target=["y"])
    with pytest.raises(ValueError, match="'none', 'batch_norm' or 'layer_norm'"):
        standalone_v06.MMOE([], sparse, [], expert_mlp_params={"hidden_dims": [2], "norm_type": "bn"},
                            tower_mlp_params_list=[{}], target=["y"])
    with pytest.raises(ValueError, match="MMOE needs target"):
        standalone_v06.MMOE([], sparse, [], expert_mlp_params={}, tower_mlp_params_list=[{}])
    with pytest.raises(ValueError, match="dot_attention"):
        standalone_v06.MMOE([], sparse, [features_v06.SequenceFeature("h", 10, combiner="max")], expert_mlp_params={},
                            tower_mlp_params_list=[{}], target=["y"])


def test_docs_example_runs():
    """The plain-loop example for the 0.6 drop-in (no nextrec needed) in docs/models.md runs as printed."""
    from nextrec_generation import run_doc_examples
    namespace = run_doc_examples("docs/models.md", "from nextrec_fast.models.standalone_v06 import MMOE")
    assert namespace["loss"].item() > 0 and namespace["model"].experts[0].mlp[0].weight.grad is not None


def test_default_drop_ins_without_nextrec_are_0_6(monkeypatch):
    """Without nextrec, ``nextrec_fast.MMOE`` / ``SparseFeature`` are the newest generation's
    plain modules and features, and they work together."""
    from nextrec_fast import models
    monkeypatch.setattr(models, "_has_module", lambda name: False)
    assert nextrec_fast.MMOE is standalone_v06.MMOE and nextrec_fast.ESMM is standalone_v06.ESMM
    assert nextrec_fast.SparseFeature is features_v06.SparseFeature
    assert nextrec_fast.DenseFeature is features_v06.DenseFeature
    model = nextrec_fast.MMOE([nextrec_fast.DenseFeature("d", input_dim=2, proj_dim=3)],
                              [nextrec_fast.SparseFeature("u", 10, embedding_dim=4)],
                              [nextrec_fast.SequenceFeature("h", 10, max_len=3, embedding_dim=4)],
                              expert_mlp_params={"hidden_dims": [8]}, tower_mlp_params_list=[{}] * 2, target=["a", "b"])
    x = {"d": torch.randn(5, 2), "u": torch.randint(0, 10, (5,)), "h": torch.randint(0, 10, (5, 3))}
    assert model.eval().call_model(x).shape == (5, 2)


@pytest.mark.nextrec
def test_top_level_features_go_with_the_top_level_models():
    """``nextrec_fast.SparseFeature`` is what ``nextrec_fast.MMOE`` takes, whichever nextrec is
    installed: the installed nextrec's own (its EmbeddingLayer checks the class, in 0.3.1 as in
    0.6), or 0.6's copies without nextrec. A model built from them runs."""
    if GENERATION in ("0.6", "0.3"):
        from nextrec.basic import features as expected
    else:
        expected = features_v06
    for name in ("SparseFeature", "SequenceFeature", "DenseFeature"):
        assert getattr(nextrec_fast, name) is getattr(expected, name), name
    assert {"MMOE", "PLE", "ESMM", "SparseFeature"} <= set(dir(nextrec_fast))
    sparse = [nextrec_fast.SparseFeature("u", vocab_size=10, embedding_dim=4)]
    if GENERATION == "0.3":
        model = nextrec_fast.MMOE([], sparse, [], expert_params={"dims": [8]}, num_experts=2,
                                  tower_params_list=[{"dims": [4]}] * 2, target=["a", "b"], task=["binary"] * 2)
    else:
        model = nextrec_fast.MMOE([], sparse, [], expert_mlp_params={"hidden_dims": [8]}, num_experts=2,
                                  tower_mlp_params_list=[{}] * 2, target=["a", "b"])
    model.eval()
    with torch.no_grad():
        out = model({"u": torch.randint(0, 10, (5,))})
    assert out.shape == (5, 2)
