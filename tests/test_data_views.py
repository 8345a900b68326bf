"""jaxlm.data.views: the seeded document split (no stored index list) and the lazy views of
prepared data."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import assert_same_batches, numbered_docs

from jaxlm.data.pipeline import make_eval_batches
from jaxlm.data.views import BLOCK, Concat, Subset, approx_len, split_views, splitmix64


class _Indices:
    """N 'documents' that are their own index: a source of any size, nothing stored."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return int(i)


def _float_split(n: int, fraction: float, seed: int) -> np.ndarray:
    # The float formula earlier versions used to return index lists: the split must not move.
    salt = splitmix64(np.asarray([seed], dtype=np.uint64))[0]
    h = splitmix64(np.arange(n, dtype=np.uint64) ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


@pytest.mark.parametrize("n", [1, 7, 10_000, 3 * BLOCK + 5])
def test_split_is_disjoint_covers_all_and_matches_the_earlier_hash(n):
    train, val = split_views(_Indices(n), 0.1, seed=0)
    t, v = list(train), list(val)
    assert sorted(t + v) == list(range(n)) and not set(t) & set(v)
    assert (len(train), len(val)) == (len(t), len(v))
    np.testing.assert_array_equal(v, np.nonzero(_float_split(n, 0.1, 0))[0])
    assert [train[i] for i in range(len(t))] == t  # random access agrees with iteration
    if v:
        assert val[len(v) - 1] == v[-1] and val[0] == v[0]  # and jumps back
    assert all(train.keeps(i) for i in t[:50]) and not any(train.keeps(i) for i in v[:50])


def test_split_is_seeded_stable_and_close_to_the_fraction():
    n = 10_000
    val = list(split_views(_Indices(n), 0.1, seed=0)[1])
    assert abs(len(val) / n - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)
    more = list(split_views(_Indices(12_000), 0.1, seed=0)[1])
    assert [i for i in more if i < n] == val  # appending documents moves none
    assert list(split_views(_Indices(n), 0.1, seed=1)[1]) != val
    with pytest.raises(ValueError, match="validation_fraction=1.5"):
        split_views(_Indices(n), 1.5, 0)


def test_split_views_store_nothing_per_document():
    train, val = split_views(_Indices(10**6), 0.1, seed=3)
    assert Concat([train, val]) and val._held_out == [None]  # truth without counting
    tracemalloc.start()
    assert train.any() and len(train) + len(val) == 10**6
    assert val[len(val) // 2] >= 0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 * BLOCK  # a few blocks of int64/uint64, not 8 bytes x 10^6


def test_views_and_eval_batches_over_lazy_sources():
    a, b = numbered_docs(5, 0), numbered_docs(4, 500_000, seed=1)
    view = Concat([Subset(a, np.array([4, 0])), b])
    assert len(view) == 6
    np.testing.assert_array_equal(view[0], a[4])
    np.testing.assert_array_equal(view[5], b[3])
    full = make_eval_batches(list(view[i] for i in range(6)), 8, 2)
    lazy = make_eval_batches(view, 8, 2, max_batches=2)
    assert_same_batches(lazy, full[:2])
    # A split view is packed by iterating it: its length is never counted.
    docs = numbered_docs(40, 0)
    _, val = split_views(docs, 0.3, seed=0)
    batches = make_eval_batches(Concat([val]), 8, 2)
    assert val._held_out == [None]
    assert_same_batches(
        batches, make_eval_batches([docs[i] for i in range(40) if val.keeps(i)], 8, 2)
    )


def test_approx_len_estimates_an_uncounted_split_without_a_pass_and_is_exact_once_counted():

    docs = [np.zeros(2, np.int32)] * 10_000
    train, val = split_views(docs, 0.1, seed=3)
    assert (approx_len(train), approx_len(val)) == (9_000, 1_000)  # nothing counted yet
    assert train._held_out[0] is None
    both = Concat([train, val])
    assert approx_len(both) == 10_000
    exact = len(train)
    assert approx_len(train) == exact and abs(exact - 9_000) < 150
    assert approx_len(val) == len(val) == 10_000 - exact
