"""MovieLens-100K as a multi-task recommendation dataset (GroupLens; F. M. Harper and J. A. Konstan,
"The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015).

The data is read from RecBole's wheel (``pip install --no-deps recbole==1.2.1`` ships
``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``), never imported from recbole and
never copied into this repository: MovieLens's licence does not allow redistribution.

Everything here is pandas and numpy: no nextrec, no torch. The features are described as plain
dicts (``FeatureSpec``); ``nextrec_fast.compat.nextrec_features`` turns them into the installed
nextrec generation's feature objects.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["MovieLens", "movielens_100k", "find_movielens_100k", "MOVIELENS_HINT", "AGE_BUCKETS"]

MOVIELENS_HINT = ("MovieLens-100K not found: `pip install --no-deps recbole==1.2.1` (2 MB; only its data files "
                  "are read), or point NEXTREC_FAST_ML100K (`demo --data`, `path=`) at a folder or a recbole wheel "
                  "holding ml-100k.{inter,user,item}")
_FILES = ("inter", "user", "item")
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
# MovieLens-1M's published age groups (under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), applied to 100K's ages.
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)


@dataclass
class MovieLens:
    """The merged, time-ordered ratings split by time, and the features that describe them.

    ``train`` / ``test``: one row per rating (per impression for ``kind="esmm"``), in time order,
    with one column per feature and target, and two metadata columns that are neither:
    ``timestamp`` and ``rating`` (the raw rating, 0 for ESMM's sampled impressions: it gives the
    labels away, so never feed it to a model; ``columns()`` and ``as_dict`` leave both out). Sparse features hold int64 ids, sequence features
    a list of int ids per row (0 is the padding id, never a real id), dense features float32.
    ``sparse`` / ``sequence`` / ``dense``: ``{"name", "vocab_size", "embedding_dim", ...}`` dicts,
    the arguments of nextrec's ``SparseFeature`` / ``SequenceFeature`` / ``DenseFeature``.
    ``targets``: the label columns (0/1 int), in the order a multi-task model predicts them."""
    train: pd.DataFrame
    test: pd.DataFrame
    dense: list[dict]
    sparse: list[dict]
    sequence: list[dict]
    targets: list[str]
    kind: str
    source: str
    info: dict = field(default_factory=dict)

    def columns(self) -> list[str]:
        return [f["name"] for f in self.dense + self.sparse + self.sequence] + self.targets

    def as_dict(self, frame: pd.DataFrame) -> dict:
        """The frame as nextrec's ``fit`` / ``predict`` take in-memory data: a dict of columns."""
        return {name: (frame[name].tolist() if frame[name].dtype == object else frame[name].to_numpy())
                for name in self.columns()}


def find_movielens_100k(path: str | os.PathLike | None = None) -> str:
    """Where the three ml-100k files are: ``path`` (a folder or a recbole wheel), else
    ``$NEXTREC_FAST_ML100K``, else the installed recbole package (found, not imported).

    Raises ``FileNotFoundError`` with how to get the data."""
    explicit = path or os.environ.get("NEXTREC_FAST_ML100K")
    if explicit:  # the user named a place: look there only, and say so when it is wrong
        if _holds_files(str(explicit)):
            return str(explicit)
        origin = "" if path else " (from NEXTREC_FAST_ML100K)"
        problem = "holds no ml-100k.{inter,user,item}" if os.path.exists(explicit) else "does not exist"
        raise FileNotFoundError(f"MovieLens-100K: {explicit}{origin} {problem}; point it at a folder or a recbole "
                                "wheel holding ml-100k.{inter,user,item} (`pip install --no-deps recbole==1.2.1` "
                                "ships them; unset NEXTREC_FAST_ML100K to use the installed recbole's copy)")
    spec = importlib.util.find_spec("recbole")  # finds the package without importing it
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(location, "dataset_example", "ml-100k")
        if _holds_files(candidate):
            return candidate
    raise FileNotFoundError(MOVIELENS_HINT)


def _holds_files(candidate: str) -> bool:
    if os.path.isfile(candidate):
        if not zipfile.is_zipfile(candidate):
            return False
        with zipfile.ZipFile(candidate) as wheel:
            return all(f"{_WHEEL_DIR}ml-100k.{f}" in wheel.namelist() for f in _FILES)
    return all(os.path.isfile(os.path.join(candidate, f"ml-100k.{f}")) for f in _FILES)


def _read(source: str, name: str) -> pd.DataFrame:
    if os.path.isfile(source):
        with zipfile.ZipFile(source) as wheel, wheel.open(f"{_WHEEL_DIR}ml-100k.{name}") as f:
            frame = pd.read_csv(f, sep="\t")
    else:
        frame = pd.read_csv(os.path.join(source, f"ml-100k.{name}"), sep="\t")
    frame.columns = [c.split(":")[0] for c in frame.columns]  # "user_id:token" -> "user_id"
    return frame


def _codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """Category ids 1..n (0 left for unknown), and the vocabulary size n + 1."""
    codes, uniques = pd.factorize(values, sort=True)
    return (codes + 1).astype(np.int64), len(uniques) + 1


def _histories(users: np.ndarray, items: np.ndarray, times: np.ndarray, length: int) -> tuple[list, np.ndarray]:
    """Per row, the user's last ``length`` movies rated strictly earlier (ties in time excluded,
    so nothing rated in the same second or later leaks in), and how many ratings the user made
    strictly earlier. Rows must be in time order."""
    out: list[list[int]] = [[] for _ in range(len(users))]
    counts = np.zeros(len(users), dtype=np.int64)
    order = np.argsort(users, kind="stable")  # per user, still in time order
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds):
        user_items, user_times = items[rows].tolist(), times[rows]
        first_at_time = np.searchsorted(user_times, user_times, side="left")
        counts[rows] = first_at_time
        for row, k in zip(rows.tolist(), first_at_time.tolist()):
            out[row] = user_items[max(0, k - length):k]
    return out, counts


def movielens_100k(kind: str = "mmoe", path: str | os.PathLike | None = None, history_length: int = 20,
                   negatives_per_rating: int = 1, test_fraction: float = 0.2, embedding_dim: int = 16,
                   sample: int | None = None, seed: int = 0) -> MovieLens:
    """MovieLens-100K, feature-engineered for multi-task learning.

    Features (one row per rating, in time order):
      - sparse ids: ``user_id``, ``item_id``, ``age_bucket`` (``AGE_BUCKETS``), ``gender``,
        ``occupation``, ``zip_prefix`` (first two characters), ``release_year``;
      - sequences: ``genres`` (the movie's genres, up to 6), ``history`` (the user's last
        ``history_length`` movies rated strictly before this rating, most recent last; it shares
        ``item_id``'s table);
      - dense: ``user_activity`` = log1p(the user's earlier ratings) / log1p(the most any user has).
    Targets: ``kind`` "mmoe" / "ple": ``like`` (rating >= 4) and ``love`` (rating = 5).
    ``kind="esmm"``: an impression space, the ratings plus ``negatives_per_rating`` movies the user
    never rated per rating, drawn uniformly with ``seed``, at the same time and with the same user
    features and history; ``click`` = rated, ``conversion`` = rated and liked (rating >= 4).

    Split by time: the first ``1 - test_fraction`` of the ratings (with their impressions) train,
    the rest test. ``sample``: only the first ``sample`` ratings in time order (a short run).

    Raises ``FileNotFoundError`` (saying how to get the data) when the files are missing,
    ``ValueError`` for an unknown ``kind`` or a ``test_fraction`` outside (0, 1)."""
    if kind not in ("mmoe", "ple", "esmm"):
        raise ValueError(f"kind must be 'mmoe', 'ple' or 'esmm', got {kind!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if sample is not None and sample < 1000:
        raise ValueError(f"sample must be at least 1000 ratings (a test split with both classes of every "
                         f"target), got {sample}")
    source = find_movielens_100k(path)
    ratings, users, items = (_read(source, name) for name in _FILES)
    # Time order; ties broken by the file's order, so the split and histories are reproducible.
    ratings = ratings.sort_values("timestamp", kind="stable").reset_index(drop=True)
    rated = ratings.groupby("user_id")["item_id"].agg(set).to_dict()  # over all ratings, before any sample
    if sample is not None:
        ratings = ratings.iloc[:sample].reset_index(drop=True)

    users = users.set_index("user_id")
    user_cols = {"age_bucket": np.searchsorted(AGE_BUCKETS, users["age"].to_numpy(), side="right").astype(np.int64) + 1}
    vocab = {"age_bucket": len(AGE_BUCKETS) + 2}
    for name, values in (("gender", users["gender"]), ("occupation", users["occupation"]),
                         ("zip_prefix", users["zip_code"].astype(str).str[:2].str.upper())):
        user_cols[name], vocab[name] = _codes(values)
    user_table = pd.DataFrame(user_cols, index=users.index)

    items = items.set_index("item_id")
    year_codes, vocab["release_year"] = _codes(items["release_year"].astype(str))
    genre_names = sorted({g for gs in items["class"].fillna("").str.split() for g in gs})
    genre_id = {g: i + 1 for i, g in enumerate(genre_names)}
    item_table = pd.DataFrame({"release_year": year_codes,
                               "genres": [[genre_id[g] for g in gs] or [0] for gs in items["class"].fillna("").str.split()]},
                              index=items.index)
    num_users, num_items = int(users.index.max()) + 1, int(items.index.max()) + 1

    u, i, t = (ratings[c].to_numpy(np.int64) for c in ("user_id", "item_id", "timestamp"))
    history, activity_count = _histories(u, i, t, history_length)
    frame = pd.DataFrame({"user_id": u, "item_id": i, "timestamp": t, "rating": ratings["rating"].to_numpy()})
    frame["history"] = history
    frame["_activity"] = activity_count
    cut = int(np.searchsorted(t, t[int(round(len(t) * (1 - test_fraction)))], side="left"))  # a second stays whole
    frame["_split"] = np.where(np.arange(len(frame)) < cut, "train", "test")

    if kind == "esmm":
        frame["click"] = 1
        frame = pd.concat([frame, _negatives(frame, rated, num_items, negatives_per_rating, seed)], ignore_index=True)
        frame = frame.sort_values(["timestamp", "click"], ascending=[True, False], kind="stable").reset_index(drop=True)
        frame["conversion"] = ((frame["click"] == 1) & (frame["rating"] >= 4)).astype(np.int64)
        frame["click"] = frame["click"].astype(np.int64)
        targets = ["click", "conversion"]
    else:
        frame["like"] = (frame["rating"] >= 4).astype(np.int64)
        frame["love"] = (frame["rating"] >= 5).astype(np.int64)
        targets = ["like", "love"]

    frame = frame.join(user_table, on="user_id").join(item_table, on="item_id")
    frame["user_activity"] = (np.log1p(frame.pop("_activity")) / np.log1p(max(activity_count.max(), 1))).astype(np.float32)
    dense = [{"name": "user_activity", "input_dim": 1}]
    sparse = [{"name": "user_id", "vocab_size": num_users, "embedding_dim": embedding_dim},
              {"name": "item_id", "vocab_size": num_items, "embedding_dim": embedding_dim, "padding_idx": 0}]
    sparse += [{"name": name, "vocab_size": vocab[name], "embedding_dim": embedding_dim}
               for name in ("age_bucket", "gender", "occupation", "zip_prefix", "release_year")]
    sequence = [{"name": "genres", "vocab_size": len(genre_names) + 1, "max_len": 6, "embedding_dim": embedding_dim,
                 "combiner": "mean", "padding_idx": 0},
                {"name": "history", "vocab_size": num_items, "max_len": history_length, "embedding_dim": embedding_dim,
                 "combiner": "mean", "padding_idx": 0, "embedding_name": "item_id"}]
    split = frame.pop("_split")
    train, test = (frame[split == s].reset_index(drop=True) for s in ("train", "test"))
    info = {"ratings": len(ratings), "users": int(frame["user_id"].nunique()), "movies": int(frame["item_id"].nunique()),
            "train_rows": len(train), "test_rows": len(test),
            "train_until": int(train["timestamp"].max()), "test_from": int(test["timestamp"].min()),
            "positive_rate": {name: round(float(frame[name].mean()), 4) for name in targets}}
    return MovieLens(train, test, dense, sparse, sequence, targets, kind, source, info)


def _negatives(frame: pd.DataFrame, rated: dict, num_items: int, per_rating: int, seed: int) -> pd.DataFrame:
    """``per_rating`` movies the user never rated (over the whole dataset) per rating, as impressions
    at the rating's time, with its history and activity: not clicked, no rating."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(len(frame)), per_rating)
    users = frame["user_id"].to_numpy()[rows]
    picks = rng.integers(1, num_items, size=len(rows))
    for k in range(len(rows)):  # redraw the few that hit a rated movie
        while picks[k] in rated[users[k]]:
            picks[k] = rng.integers(1, num_items)
    negatives = frame.iloc[rows].reset_index(drop=True).copy()
    negatives["item_id"] = picks
    negatives["rating"] = 0
    negatives["click"] = 0
    return negatives
