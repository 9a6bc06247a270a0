"""nextrec's sequence-column padding, vectorised under accelerate: identical arrays to nextrec's
own function (whichever generation is installed) on random columns, and nextrec's function
(with its errors) for everything the vectorised path does not take."""
from __future__ import annotations

import importlib
import os
import random
import time

import numpy as np
import pandas as pd
import pytest

from nextrec_fast import compat
from nextrec_fast.integration.data import pad_sequence_column
from nextrec_generation import GENERATION

pytestmark = pytest.mark.nextrec
if GENERATION not in ("0.3", "0.6"):
    pytest.skip("nextrec 0.3.x or 0.6.x is not installed (CI runs both: see .ci/run)", allow_module_level=True)
GEN = compat.V06 if GENERATION == "0.6" else compat.V03
RUN_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED", time.time_ns() % 2**31))


def _feature(max_len, padding_idx):
    from nextrec.basic.features import SequenceFeature
    return SequenceFeature("s", 50, max_len=max_len, padding_idx=padding_idx)


def _original():
    module_name, name = GEN.sequence_column_function
    return getattr(importlib.import_module(module_name), name)


def _random_column(rng: random.Random, rows: int, max_len: int):
    kind = rng.choice(["list", "tuple", "array", "series", "object_array"])
    seqs = [[rng.randrange(50) for _ in range(rng.randint(0, max_len + 3))] for _ in range(rows)]
    if kind == "tuple":
        return [tuple(s) for s in seqs]
    if kind == "array":
        return [np.asarray(s, dtype=rng.choice([np.int64, np.int32])) for s in seqs]
    if kind == "series":
        return pd.Series(seqs)
    if kind == "object_array":
        column = np.empty(rows, dtype=object)
        column[:] = seqs
        return column
    return seqs


@pytest.mark.parametrize("case", range(12))
def test_vectorised_padding_equals_nextrec(case):
    seed = RUN_SEED + case
    print(f"seed={seed} (NEXTREC_FAST_TEST_SEED={RUN_SEED})")
    rng = random.Random(seed)
    max_len, pad = rng.randint(1, 8), rng.choice([0, 3])
    feature = _feature(max_len, pad)
    column = _random_column(rng, rng.randint(1, 60), max_len)
    nextrecs = _original()
    expected = nextrecs(column, feature)
    with GEN.fast_sequence_columns():
        assert _original() is not nextrecs  # nextrec's data path now calls the vectorised padding
        got = _original()(column, feature)
    assert _original() is nextrecs  # and its own function again afterwards
    assert got.dtype == expected.dtype == np.int64 and got.shape == expected.shape
    assert np.array_equal(got, expected)
    rule = GEN.sequence_padding(feature)
    assert np.array_equal(pad_sequence_column(column, *rule), expected)


def test_other_columns_take_nextrecs_function():
    feature = _feature(4, 0)
    for column in (np.arange(12).reshape(3, 4), np.arange(5), [], [[1, 2], "3 4"]):
        assert pad_sequence_column(column, 4, 0) is None
    with GEN.fast_sequence_columns():
        assert np.array_equal(_original()(np.arange(12).reshape(3, 4), feature), np.arange(12).reshape(3, 4))
