"""MovieLens-100K: the feature engineering (no leakage, the split by time, ESMM's impressions) and
the demo's quality parity on real data: accelerated nextrec trains to the same test AUC as plain
nextrec, within what float32 rounding alone moves it."""
import os
import random
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from nextrec_fast.datasets import MOVIELENS_HINT, find_movielens_100k, movielens_100k

try:
    SOURCE = find_movielens_100k()
except FileNotFoundError:
    SOURCE = None
needs_data = pytest.mark.skipif(SOURCE is None, reason=MOVIELENS_HINT)
SEED = random.randrange(2**31)  # the sampled ESMM negatives; printed by the tests that use it


@pytest.fixture(scope="module")
def ratings():
    return movielens_100k("mmoe", sample=30000)


@needs_data
def test_split_by_time_and_targets(ratings):
    assert ratings.train["timestamp"].max() < ratings.test["timestamp"].min()
    assert len(ratings.train) + len(ratings.test) == 30000
    assert 0.75 < len(ratings.train) / 30000 < 0.85
    for frame in (ratings.train, ratings.test):
        assert (frame["like"] == (frame["rating"] >= 4)).all() and (frame["love"] == (frame["rating"] == 5)).all()
        assert frame["timestamp"].is_monotonic_increasing


@needs_data
def test_history_holds_only_earlier_ratings(ratings):
    frame = ratings.train
    seen = {}
    for user, item, ts, history in zip(frame["user_id"], frame["item_id"], frame["timestamp"], frame["history"]):
        earlier = [i for i, t in seen.get(user, []) if t < ts]
        assert history == earlier[-20:], (user, ts)
        seen.setdefault(user, []).append((item, ts))


@needs_data
def test_ids_fit_their_tables(ratings):
    frame = ratings.train
    for spec in ratings.sparse:
        ids = frame[spec["name"]].to_numpy()
        assert ids.min() >= 1 and ids.max() < spec["vocab_size"], spec["name"]  # 0 stays the padding id
    for spec in ratings.sequence:
        lengths = frame[spec["name"]].map(len)
        assert lengths.max() <= spec["max_len"]
        flat = np.concatenate([np.asarray(v, dtype=np.int64) for v in frame[spec["name"]] if len(v)])
        assert flat.min() >= 1 and flat.max() < spec["vocab_size"], spec["name"]
    assert frame["user_activity"].between(0, 1).all()


@needs_data
def test_esmm_impressions():
    print(f"seed={SEED}")
    data = movielens_100k("esmm", sample=20000, seed=SEED)
    frame = pd.concat([data.train, data.test], ignore_index=True)
    everything = movielens_100k("mmoe")
    rated = pd.concat([everything.train, everything.test]).groupby("user_id")["item_id"].agg(set)
    negatives = frame[frame["click"] == 0]
    assert len(negatives) == (frame["click"] == 1).sum()  # one per rating
    # never a movie the user rated, at any time in the whole dataset
    assert not any(item in rated[user] for user, item in zip(negatives["user_id"], negatives["item_id"]))
    assert ((frame["conversion"] == 1) == ((frame["click"] == 1) & (frame["rating"] >= 4))).all()
    assert data.train["timestamp"].max() < data.test["timestamp"].min()


@needs_data
def test_reads_a_folder_and_says_how_to_get_missing_data(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    for name in ("inter", "user", "item"):
        if os.path.isfile(SOURCE):
            with zipfile.ZipFile(SOURCE) as wheel, wheel.open(f"recbole/dataset_example/ml-100k/ml-100k.{name}") as f:
                (folder / f"ml-100k.{name}").write_bytes(f.read())
        else:
            shutil.copy(os.path.join(SOURCE, f"ml-100k.{name}"), folder)
    assert find_movielens_100k(folder) == str(folder)
    assert len(movielens_100k("mmoe", path=folder, sample=1000).train) > 0
    (folder / "ml-100k.user").unlink()
    with pytest.raises(FileNotFoundError, match="recbole==1.2.1"):
        movielens_100k("mmoe", path=folder)
    with pytest.raises(ValueError, match="kind"):
        movielens_100k("din", path=SOURCE)


@pytest.mark.nextrec
@needs_data
@pytest.mark.parametrize("kind", ["mmoe", "ple", "esmm"])
def test_accelerated_fit_reaches_plain_quality_on_movielens(kind):
    """One epoch on the first 50,000 ratings, 4 runs each of plain and accelerated nextrec ``fit``
    (from the initial weights and from 3 copies moved one ulp per element): the mean test AUCs per
    task agree by Welch's t test at a two-sided 1e-4 level (``demo.parity``): a correct fast path
    fails it once in 10,000 runs, if AUC noise is normal. Seeds are fixed (0; ulp directions 1-3)."""
    pytest.importorskip("nextrec")
    from nextrec_fast.bench.demo import run_demo
    result = run_demo(models=[kind], epochs=1, batch_size=1024, sample=50000, seed=0, rounding_runs=3,
                      variants=("nextrec", "accelerated"), progress=False)
    entry = result["models"][kind]
    print({task: {k: v for k, v in p.items()} for task, p in entry["parity"].items()})
    for task, verdict in entry["parity"].items():
        assert len(verdict["plain_aucs"]) == 4 and len(verdict["accelerated_aucs"]) == 4
        assert verdict["within"], (task, verdict)
    # Training happened: the first task's AUC moved from the untrained model's.
    first = entry["runs"]["accelerated"]["curve"]
    task = next(iter(first[0][1]))
    assert abs(first[-1][1][task]["auc"] - first[0][1][task]["auc"]) > 0.01


@pytest.mark.nextrec
@needs_data
@pytest.mark.parametrize("table_optimizer, words, lr", [("sparse_adam", "lazy Adam", 1e-3),
                                                        ("rowwise_adagrad", "row-wise Adagrad", 0.1)])
def test_tables_in_backward_variant_runs_beside_plain(table_optimizer, words, lr, monkeypatch):
    """The opt-in demo variant: accelerate(embedding_optimizer=(the named class, its default lr))
    under nextrec's own fit (0.3.1's default table regularisation switched off for it), scored
    like the others and compared with plain nextrec's AUC in the table."""
    pytest.importorskip("nextrec")
    import math

    import nextrec_fast
    from nextrec_fast import optim
    from nextrec_fast.bench.demo import format_demo, run_demo
    asked = []
    accelerate = nextrec_fast.accelerate

    def recording_accelerate(model, **kwargs):
        asked.append(kwargs.get("embedding_optimizer"))
        return accelerate(model, **kwargs)
    monkeypatch.setattr(nextrec_fast, "accelerate", recording_accelerate)
    result = run_demo(models=["mmoe"], epochs=1, batch_size=1024, sample=5000, seed=0, rounding_runs=0,
                      variants=("nextrec", "accelerated_tables"), progress=False, table_optimizer=table_optimizer)
    expected = {"sparse_adam": torch.optim.SparseAdam, "rowwise_adagrad": optim.RowWiseAdagrad}[table_optimizer]
    assert asked == [(expected, {"lr": lr})]
    assert result["environment"]["table_optimizer"] == table_optimizer
    runs = result["models"]["mmoe"]["runs"]
    assert set(runs) == {"nextrec", "accelerated_tables"}
    assert all(math.isfinite(m["auc"]) for m in runs["accelerated_tables"]["final"].values())
    assert f"tables by {words}" in format_demo(result)
    assert "against plain nextrec's Adam, test AUC difference" in format_demo(result)


@pytest.mark.nextrec
@needs_data
@pytest.mark.parametrize("kind", ["mmoe", "esmm"])
def test_demo_scores_what_nextrec_predict_gives(kind, tmp_path, monkeypatch):
    """The demo scores batches of tensors (``compat`` ``probabilities``); nextrec's ``predict`` on the
    frame's columns gives the same probabilities, so the demo's AUCs are nextrec's."""
    pytest.importorskip("nextrec")
    import torch

    from nextrec_fast.bench.demo import _quiet, _tensors, demo_model_kwargs
    from nextrec_fast.compat import installed_generation
    monkeypatch.chdir(tmp_path)
    generation = installed_generation()
    data = movielens_100k(kind, sample=3000)
    test = data.test.iloc[:300].reset_index(drop=True)
    torch.manual_seed(0)
    with _quiet():
        model = generation.model_class(kind)(*generation.features(data.dense, data.sparse, data.sequence),
                                             **generation.model_arguments(kind, demo_model_kwargs(kind, data.targets)))
        expected = np.asarray(model.predict(data.as_dict(test), batch_size=128, return_dataframe=False))
    batch, _ = _tensors(data, test)
    model.eval()
    with torch.no_grad():
        got = generation.probabilities(model, batch).numpy()
    np.testing.assert_allclose(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, message", [(["--epochs", "0"], "must be at least"),
                                           (["--sample", "5"], "must be at least"),
                                           (["--rounding-runs", "-1"], "must be at least"),
                                           (["--table-optimizer", "adam"], "invalid choice: 'adam'")])
def test_demo_refuses_arguments_it_cannot_use(argv, message, capsys):
    from nextrec_fast import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_demo_names_an_unknown_table_optimizer():
    from nextrec_fast.bench.demo import default_table_lr, run_demo
    with pytest.raises(ValueError, match="unknown table_optimizer 'adam'.*sparse_adam"):
        run_demo(table_optimizer="adam")
    assert default_table_lr("sparse_adam", 3e-4) == 3e-4 and default_table_lr("rowwise_adagrad", 3e-4) == 0.1


@needs_data
def test_a_missing_path_says_where_it_came_from(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXTREC_FAST_ML100K", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="from NEXTREC_FAST_ML100K.*does not exist"):
        find_movielens_100k()
    with pytest.raises(ValueError, match="at least 1000"):
        movielens_100k("mmoe", path=SOURCE, sample=10)


@pytest.mark.nextrec
@needs_data
@pytest.mark.parametrize("bf16_runs", [True, False])
def test_bf16_fit_variant_runs_nextrecs_fit_under_autocast(bf16_runs, monkeypatch):
    """``accelerated_bf16``: the accelerated model's own nextrec ``fit`` inside
    ``torch.autocast("cpu", torch.bfloat16)``: its training forwards run the fast path under
    autocast, the result is scored like the others; where bf16 matmuls are emulated (the measured
    slowdown, set here) the variant is skipped and the table says why."""
    pytest.importorskip("nextrec")
    import math

    from nextrec_fast.bench import common
    from nextrec_fast.bench.demo import format_demo, run_demo
    from nextrec_fast.models import forwards
    monkeypatch.setattr(common, "bf16_matmul_slowdown", lambda: 1.0 if bf16_runs else 80.0)
    seen = []
    real = forwards.run_experts

    def recording(*args, **kwargs):
        if torch.is_grad_enabled():  # training forwards (scoring runs under no_grad)
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args, **kwargs)
    monkeypatch.setattr(forwards, "run_experts", recording)  # what the fast forwards call
    result = run_demo(models=["mmoe"], epochs=1, batch_size=1024, sample=5000, seed=0, rounding_runs=0,
                      variants=("accelerated", "accelerated_bf16"), progress=False)
    entry = result["models"]["mmoe"]
    table = format_demo(result)
    if bf16_runs:
        assert set(entry["runs"]) == {"accelerated", "accelerated_bf16"}
        assert all(math.isfinite(m["auc"]) for m in entry["runs"]["accelerated_bf16"]["final"].values())
        assert True in seen and False in seen, "no training forward under bf16 autocast, or none without"
        assert "accelerated, nextrec's fit in bf16 autocast" in table
    else:
        assert set(entry["runs"]) == {"accelerated"} and "accelerated_bf16" in entry["skipped"]
        assert seen and not any(seen)
        assert "skipped" in table and "80x slower" in table


@pytest.mark.nextrec
@needs_data
def test_bf16_tables_variant_trains_with_bfloat16_tables(monkeypatch):
    """``accelerated_bf16_tables``: nextrec's ``fit`` on the accelerated model whose tables were
    cast to bfloat16 (``embedding.cast_tables``) before the first step: the pooling op reads
    bfloat16 tables during training, nextrec's Adam moves them, and the run is scored."""
    pytest.importorskip("nextrec")
    import math

    from nextrec_fast.bench.demo import format_demo, run_demo
    from nextrec_fast.ops import pooled_embedding
    seen = []
    real = pooled_embedding.pooled_embedding

    def recording(tables, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(tables[0].dtype)
        return real(tables, *args, **kwargs)
    monkeypatch.setattr(pooled_embedding, "pooled_embedding", recording)
    result = run_demo(models=["mmoe"], epochs=1, batch_size=1024, sample=5000, seed=0, rounding_runs=0,
                      variants=("accelerated", "accelerated_bf16_tables"), progress=False)
    runs = result["models"]["mmoe"]["runs"]
    assert set(runs) == {"accelerated", "accelerated_bf16_tables"}
    assert all(math.isfinite(m["auc"]) for m in runs["accelerated_bf16_tables"]["final"].values())
    assert torch.bfloat16 in seen and torch.float32 in seen, f"training pooled tables of {set(seen)}"
    assert "accelerated, bf16 tables, nextrec's fit" in format_demo(result)
