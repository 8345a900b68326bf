"""jaxlm.data.views: the seeded document split and the lazy views of prepared data."""

from __future__ import annotations

import numpy as np
from conftest import assert_same_batches, numbered_docs

from jaxlm.data.pipeline import make_eval_batches
from jaxlm.data.views import Concat, Subset, hash_split


def test_hash_split_is_seeded_stable_and_close_to_the_fraction():
    train, val = hash_split(10_000, 0.1, seed=0)
    assert len(train) + len(val) == 10_000 and set(train).isdisjoint(val)
    assert abs(len(val) / 10_000 - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 10_000)
    more_train, more_val = hash_split(12_000, 0.1, seed=0)
    np.testing.assert_array_equal(more_val[more_val < 10_000], val)  # appending moves nothing
    np.testing.assert_array_equal(hash_split(10_000, 0.1, seed=0)[1], val)
    assert not np.array_equal(hash_split(10_000, 0.1, seed=1)[1], val)


def test_views_and_eval_batches_over_lazy_sources():
    a, b = numbered_docs(5, 0), numbered_docs(4, 500_000, seed=1)
    view = Concat([Subset(a, np.array([4, 0])), b])
    assert len(view) == 6
    np.testing.assert_array_equal(view[0], a[4])
    np.testing.assert_array_equal(view[5], b[3])
    full = make_eval_batches(list(view[i] for i in range(6)), 8, 2)
    lazy = make_eval_batches(view, 8, 2, max_batches=2)
    assert_same_batches(lazy, full[:2])
