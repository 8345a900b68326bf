"""jaxlm.data.permute and data/order.py: the keyed permutation is a permutation, seeded and
fresh each epoch; a training stream over a hash-split source visits each training document
once per epoch, never a held-out one, stores nothing per document, resumes exactly, and
gives the same global batch on 1, 2 or 4 processes and with worker processes."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from conftest import BOS, RecordingDocs, assert_one_sentence, assert_same_batches, numbered_docs

from jaxlm.config import load_config
from jaxlm.data.order import StreamOrder, stream_size
from jaxlm.data.permute import Permutation
from jaxlm.data.pipeline import BATCH_KEYS, WeightedSource, make_train_iterator
from jaxlm.data.synthetic import SyntheticDocs
from jaxlm.data.views import split_views
from jaxlm.errors import ConfigError


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


# --- the permutation -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 13, 16, 64, 97, 1000, 1024, 1025, 65537])
def test_permutation_is_a_bijection_and_scalar_equals_vector(n):
    perm = Permutation(n, seed=11, epoch=2)
    image = perm.take(np.arange(n))
    np.testing.assert_array_equal(np.sort(image), np.arange(n))
    for i in sorted({0, n // 3, n - 1}):
        assert perm(i) == image[i]
    np.testing.assert_array_equal(perm.block(n // 2, n), image[n // 2 :])
    with pytest.raises(IndexError):
        perm(n)


def test_permutation_is_seeded_and_fresh_per_epoch_and_seed():
    n = 1000
    base = Permutation(n, 7, 0).take(np.arange(n))
    np.testing.assert_array_equal(Permutation(n, 7, 0).take(np.arange(n)), base)
    others = [Permutation(n, 7, 1), Permutation(n, 8, 0), Permutation(n, 0, 7)]
    for other in others:
        img = other.take(np.arange(n))
        assert np.mean(img == base) < 0.02  # about 1/n agree by chance
    assert np.mean(base == np.arange(n)) < 0.02  # not the identity either
    # (seed, epoch) = (7, 0) and (0, 7) differ: keys are chained, not XOR-ed.


def test_permutation_spreads_each_position_evenly():
    # Where position 0 lands, over many seeds, is close to uniform over a small domain.
    n, trials = 10, 3000
    counts = np.bincount([Permutation(n, s)(0) for s in range(trials)], minlength=n)
    expected = trials / n
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


def test_permutation_handles_a_billion_positions():
    perm = Permutation(10**9, seed=1, epoch=3)
    block = perm.block(10**9 - 4096, 10**9)
    assert len(np.unique(block)) == 4096 and block.min() >= 0 and block.max() < 10**9
    assert perm(123_456_789) == perm.take(np.array([123_456_789]))[0]


# --- a stream over a hash split --------------------------------------------------------------


def _doc_ids(docs) -> list[int]:
    return [int(d) for d in docs]


class _Indices:
    """Documents that are their own index (ints), so a stream's output names what it read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return int(i)


@pytest.mark.parametrize("n,streams", [(1, 1), (2, 1), (97, 1), (97, 4), (3000, 7)])
def test_stream_visits_each_training_document_once_per_epoch(n, streams):
    train, val = split_views(_Indices(n), 0.2, seed=5)
    held_out = set(val)
    for k in range(min(streams, n)):
        mine = [i for i in range(k, n, streams) if i not in held_out]
        if not mine:
            continue
        it = iter(StreamOrder(train, k, streams, seed=3))
        epochs = [_doc_ids(next(it) for _ in range(len(mine))) for _ in range(3)]
        for e in epochs:
            assert sorted(e) == mine  # every training document of the stream, once
        if len(mine) > 20:
            assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
        assert it.get_state()["position"] >= 3 * len(mine)


def test_stream_of_only_held_out_documents_says_so():
    train, val = split_views(_Indices(40), 0.5, seed=0)
    k = next(i for i in range(40) if i in set(val))
    it = iter(StreamOrder(train, k, 40, seed=0))  # stream k holds document k only
    with pytest.raises(ConfigError, match="no training document"):
        next(it)
    # The pipeline finds such a stream before the first batch and names the fix.
    with pytest.raises(ConfigError, match="held out for validation; lower data.streams=40"):
        make_train_iterator(train, 8, 40, 0, streams=40)


def test_stream_memory_is_flat_in_the_number_of_documents():
    peaks = {}
    for n in (10**4, 10**9):
        train, _ = split_views(_Indices(n), 0.1, seed=0)
        tracemalloc.start()
        it = iter(StreamOrder(train, 3, 8, seed=1))
        first = [next(it) for _ in range(1000)]  # within one epoch
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(set(first)) == len(first)
    assert peaks[10**9] < 2 * peaks[10**4] + 50_000, peaks
    assert stream_size(10**9, 3, 8) == 125_000_000


# --- the train iterator over split sources ---------------------------------------------------


def _split_sources(n=(60, 45)) -> tuple[list[WeightedSource], list[set[int]]]:
    out, held = [], []
    for s, count in enumerate(n):
        docs = numbered_docs(count, base=1_000_000 * (s + 1), lo=3, hi=25, seed=s)
        train, val = split_views(docs, 0.2, seed=9)
        out.append(WeightedSource(train, 0.6 - 0.2 * s, f"src{s}", 14.0))
        held.append({int(d[1]) for d in val if len(d) > 2})
    return out, held


def test_train_batches_never_hold_a_held_out_document():
    srcs, held = _split_sources()
    batches = _take(make_train_iterator(srcs, 16, 8, 1, streams=4), 40)
    firsts = {
        int(t)
        for b in batches
        for i, t in zip(b["inputs"].ravel(), b["targets"].ravel(), strict=True)
        if i == BOS
    }
    assert firsts and not firsts & set().union(*held)


@pytest.mark.parametrize("streams", [1, 4])
def test_resume_mid_epoch_and_across_epoch_boundaries(streams):
    srcs, _ = _split_sources((30, 22))
    make = lambda: make_train_iterator(srcs, 16, 8, 4, streams=streams)  # noqa: E731
    # 40 steps of 8x16 tokens cover several epochs of ~50 short training documents.
    reference = _take(make(), 40)
    it = make()
    for step in range(36):
        if step % 5 == 0:
            state = json.loads(json.dumps(it.get_state()))
            resumed = make()
            resumed.set_state(state)
            assert_same_batches(_take(resumed, 4), reference[step : step + 4])
        next(it)


def test_global_batch_is_the_same_on_1_2_4_processes_with_disjoint_reads():
    docs = numbered_docs(96, base=0)
    train, _ = split_views(docs, 0.25, seed=2)
    batch, steps = 8, 12
    whole = _take(make_train_iterator(train, 12, batch, 3, streams=8), steps)
    for n_proc in (1, 2, 4):
        parts, readers = [], []
        for p in range(n_proc):
            rec = RecordingDocs(docs)
            view, _ = split_views(rec, 0.25, seed=2)
            it = make_train_iterator(view, 12, batch, 3, p, n_proc, streams=8)
            parts.append(_take(it, steps))
            readers.append(rec.read)
        for step in range(steps):
            for k in BATCH_KEYS:
                joined = np.concatenate([part[step][k] for part in parts])
                np.testing.assert_array_equal(joined, whole[step][k])
        for a in range(n_proc):
            for b in range(a + 1, n_proc):
                assert not readers[a] & readers[b]


def test_worker_processes_give_the_same_batches_and_positions():
    srcs, _ = _split_sources()
    make = lambda w, **kw: make_train_iterator(srcs, 16, 8, 2, streams=4, workers=w, **kw)  # noqa: E731
    reference, plain = [], make(0)
    saved = None
    for step in range(14):
        if step == 3:
            saved = json.loads(json.dumps(plain.get_state()))
        reference.append(next(plain))
    # One start of two workers (each imports Grain and JAX: seconds) covers it all: the
    # position has one form for any worker count, so it moves between them both ways.
    it = make(2, prefetch=2)
    try:
        it.set_state(saved)
        assert_same_batches(_take(it, 6), reference[3:9])
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    resumed = make(0)
    resumed.set_state(state)
    assert_same_batches(_take(resumed, 5), reference[9:])
    with pytest.raises(ValueError, match="data.workers=-1"):
        make(-1)


def test_a_synthetic_billion_document_source_feeds_the_pipeline():
    docs = SyntheticDocs(10**9, mean_tokens=20, vocab_size=500, seed=1)
    assert len(docs[0]) >= 2 and docs[10**9 - 1][0] == 2 and docs[5].max() < 500
    np.testing.assert_array_equal(docs[123], SyntheticDocs(10**9, 20, 500, seed=1)[123])
    train, _ = split_views(docs, 0.01, seed=0)
    it = make_train_iterator([WeightedSource(train, 1.0, "synthetic", 20.0)], 32, 4, 0, streams=4)
    batch = next(it)
    assert batch["inputs"].shape == (4, 32) and batch["weights"].min() == 1.0


def test_negative_workers_is_one_sentence_naming_the_key():
    assert load_config(None, ["data.workers=2"]).data.workers == 2
    with pytest.raises(ConfigError, match="data.workers=-1") as e:
        load_config(None, ["data.workers=-1"])
    assert_one_sentence(str(e.value))
