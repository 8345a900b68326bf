"""jaxlm.data.pipeline: packing documents into rows (segments, positions, padding), the train
iterator over one or several streams and sources (determinism, resume, processes, mixture
weights) and eval batches. The lazy views of prepared data: test_data_views.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BOS, EOS, RecordingDocs
from conftest import assert_same_batches as _assert_same
from conftest import numbered_docs as _docs

from jaxlm.data.pipeline import (
    BATCH_KEYS,
    WeightedSource,
    make_eval_batches,
    make_train_iterator,
    tokenize_documents,
)


def _doc_of(token: int, base: int = 0) -> int:
    return (int(token) - base) // 1000


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _mixture(weights=(0.7, 0.3)) -> list[WeightedSource]:
    # Source s: ids >= 10^6 * (s+1), so every token names its source; lengths differ by source.
    out = []
    for s, w in enumerate(weights):
        docs = _docs(40 + 10 * s, base=1_000_000 * (s + 1), lo=3 + 10 * s, hi=20 + 20 * s, seed=s)
        mean = float(np.mean([len(d) for d in docs]))
        out.append(WeightedSource(docs, w, f"src{s}", mean))
    return out


def _synthetic_docs(n_docs: int = 23, seed: int = 0) -> list[np.ndarray]:
    """Documents [bos, distinct values..., eos] so every (input, target) pair is unique."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 30, size=n_docs)  # some longer than a row, some just bos+eos
    return [
        np.asarray([2, *range(1000 * (i + 1), 1000 * (i + 1) + n - 2), 3], np.int32)
        for i, n in enumerate(lengths)
    ]


def _pairs(docs):
    return [(int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:], strict=True)]


def _rows(batches, key):
    return np.concatenate([b[key] for b in batches])


def _check_row_structure(batch, seq_len, synthetic=True):
    for key in BATCH_KEYS:
        assert batch[key].shape[1] == seq_len
    assert {k: batch[k].dtype for k in BATCH_KEYS} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "weights": np.float32,
    }
    for seg, pos, w, inp, tgt in zip(
        *(batch[k] for k in ("segment_ids", "positions", "weights", "inputs", "targets")),
        strict=True,
    ):
        real = seg > 0
        np.testing.assert_array_equal(w, real.astype(np.float32))
        assert np.all(seg[~real] == 0) and np.all(np.diff(real.astype(int)) <= 0)  # pad at end
        ids = seg[real]
        if ids.size == 0:  # a whole padding row (eval batches only)
            continue
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for s in np.unique(ids):
            np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
        if synthetic:  # next token of the same document: +1, or out of bos, or into eos
            for a, b in zip(inp[real], tgt[real], strict=True):
                assert b != 2 and (a == 2 or b == 3 or b == a + 1)


# --- one stream: packing, determinism, host shards, eval batches ------------------------------


def test_train_packing_covers_each_pair_once_per_epoch():
    docs, seq_len, batch_size = _synthetic_docs(), 16, 4
    expected = _pairs(docs)
    n_rows = -(-len(expected) // seq_len) * 2  # two epochs, rounded up to whole rows
    batches = _take(make_train_iterator(docs, seq_len, batch_size, seed=3), -(-n_rows // 4))
    for b in batches:
        _check_row_structure(b, seq_len)
    # An endless stream packs without padding, so its first len(expected) tokens are epoch 1.
    stream = list(
        zip(_rows(batches, "inputs").ravel(), _rows(batches, "targets").ravel(), strict=True)
    )
    stream = [(int(a), int(b)) for a, b in stream]
    epoch1, epoch2 = stream[: len(expected)], stream[len(expected) : 2 * len(expected)]
    assert sorted(epoch1) == sorted(expected) and len(set(epoch1)) == len(expected)
    assert sorted(epoch2) == sorted(expected)
    # Each epoch is shuffled afresh: document order (by first target) differs.
    first_targets = lambda s: [b for a, b in s if a == 2]
    assert first_targets(epoch1) != first_targets(epoch2)
    assert first_targets(epoch1) != [int(d[1]) for d in docs]


def test_train_determinism_and_json_state_restore():
    docs = _synthetic_docs()
    run = lambda seed, n=12: _take(make_train_iterator(docs, 16, 4, seed=seed), n)
    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b, strict=True):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))
    # Save the state at every step (through JSON, as grain.checkpoint stores it) and resume.
    it = make_train_iterator(docs, 16, 4, seed=0)
    for step in range(8):
        state = json.loads(json.dumps(it.get_state()))
        resumed = make_train_iterator(docs, 16, 4, seed=0)
        resumed.set_state(state)
        for x, y in zip(_take(resumed, 4), a[step : step + 4], strict=True):
            for k in BATCH_KEYS:
                np.testing.assert_array_equal(x[k], y[k])
        next(it)


def test_train_shards_partition_global_batch():
    docs = _synthetic_docs()
    whole = _take(make_train_iterator(docs, 8, 6, seed=5), 5)
    shards = [
        _take(make_train_iterator(docs, 8, 6, seed=5, shard_index=i, shard_count=2), 5)
        for i in range(2)
    ]
    for step, batch in enumerate(whole):
        parts = [s[step] for s in shards]
        assert all(p["inputs"].shape == (3, 8) for p in parts)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
        rows = [tuple(r) for p in parts for r in p["targets"]]
        assert len(set(rows)) == len(rows)  # disjoint
    with pytest.raises(ValueError, match="7"):
        make_train_iterator(docs, 8, 7, seed=0, shard_count=2)


def test_eval_batches_cover_every_target_once():
    docs, seq_len, batch_size = _synthetic_docs(17, seed=1), 16, 3
    batches = make_eval_batches(docs, seq_len, batch_size)
    assert len(batches) >= 2
    for b in batches:
        assert b["inputs"].shape == (batch_size, seq_len)
        _check_row_structure(b, seq_len)
    total_tokens = sum(len(d) for d in docs)
    assert sum(float(b["weights"].sum()) for b in batches) == total_tokens - len(docs)
    real = [
        (int(a), int(t))
        for b in batches
        for a, t, w in zip(
            b["inputs"].ravel(), b["targets"].ravel(), b["weights"].ravel(), strict=True
        )
        if w > 0
    ]
    assert real == _pairs(docs)  # in order, each exactly once
    again = make_eval_batches(docs, seq_len, batch_size)
    assert all(
        np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, again, strict=True)
    )


def test_tokenize_documents_wraps_in_bos_eos(tiny_tok):
    token_docs = tokenize_documents(["a lazy dog", "東京"], tiny_tok)
    assert all(d.dtype == np.int32 and d[0] == 2 and d[-1] == 3 for d in token_docs)
    assert tiny_tok.decode(token_docs[1]) == "東京"
    batch = next(make_train_iterator(token_docs, 4, 2, seed=0))
    _check_row_structure(batch, 4, synthetic=False)


# --- determinism and resume ------------------------------------------------------------------


@pytest.mark.parametrize("streams,prefetch", [(1, 0), (4, 2)])
def test_same_seed_same_batches_and_other_seed_differs(streams, prefetch):
    srcs = _mixture()

    def run(seed):
        it = make_train_iterator(srcs, 16, 8, seed, streams=streams, prefetch=prefetch)
        return _take(it, 10)

    a, b, c = run(0), run(0), run(1)
    _assert_same(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("streams,shard", [(4, (0, 1)), (4, (1, 2)), (2, (0, 1))])
def test_resume_from_json_state_mid_epoch_equals_uninterrupted(streams, shard):
    srcs = _mixture()
    make = lambda: make_train_iterator(  # noqa: E731
        srcs, 16, 8, 7, shard_index=shard[0], shard_count=shard[1], streams=streams, prefetch=2
    )
    reference = _take(make(), 14)
    it = make()
    for step in range(10):
        if step in (0, 3, 7, 9):
            state = json.loads(json.dumps(it.get_state()))  # as grain.checkpoint stores it
            resumed = make()
            resumed.set_state(state)
            _assert_same(_take(resumed, 4), reference[step : step + 4])
        next(it)


def test_resume_through_an_orbax_checkpoint(tmp_path):
    from jaxlm.config import CheckpointConfig
    from jaxlm.train.checkpoint import Checkpointer

    srcs = _mixture()
    make = lambda: make_train_iterator(srcs, 16, 8, 2, streams=4, prefetch=2)  # noqa: E731
    reference = _take(make(), 9)
    it = make()
    _take(it, 5)
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=False))
    state = {"w": np.zeros(2, np.float32)}
    ckpt.save(5, state, it, {"note": "test"})
    ckpt.close()
    resumed = make()
    Checkpointer(tmp_path / "ckpt", CheckpointConfig(), read_only=True).restore(5, state, resumed)
    _assert_same(_take(resumed, 4), reference[5:])


@pytest.mark.parametrize("new_count", [1, 4])
def test_stream_states_of_two_processes_resume_on_another_count(new_count):
    # Elastic resume: states are keyed by global stream index, so the union of what 2
    # processes saved restores 1 or 4 processes, whose rows continue the global batches.
    srcs, streams, batch = _mixture(), 4, 8
    reference = _take(make_train_iterator(srcs, 16, batch, 7, streams=streams), 9)
    saved = {}
    for p in range(2):
        it = make_train_iterator(srcs, 16, batch, 7, shard_index=p, shard_count=2, streams=4)
        _take(it, 5)
        saved.update(json.loads(json.dumps(it.get_state()))["streams"])
    rows = batch // new_count
    for p in range(new_count):
        it = make_train_iterator(
            srcs, 16, batch, 7, shard_index=p, shard_count=new_count, streams=streams
        )
        it.set_state({"streams": saved})
        want = [{k: v[p * rows : (p + 1) * rows] for k, v in b.items()} for b in reference[5:]]
        _assert_same(_take(it, 4), want)


# --- several processes -----------------------------------------------------------------------


@pytest.mark.parametrize("n_proc", [2, 4])
def test_process_shards_union_is_the_global_batch(n_proc):
    docs = _docs(64, base=0)
    streams, batch, steps = 4, 8, 30
    whole = _take(make_train_iterator(docs, 12, batch, 3, streams=streams), steps)
    recorders, parts = [], []
    for p in range(n_proc):
        rec = RecordingDocs(docs)
        it = make_train_iterator(
            rec, 12, batch, 3, shard_index=p, shard_count=n_proc, streams=streams
        )
        parts.append(_take(it, steps))
        recorders.append(rec)
    for step in range(steps):
        rows = [part[step] for part in parts]
        assert all(r["inputs"].shape == (batch // n_proc, 12) for r in rows)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([r[k] for r in rows]), whole[step][k])
    # Each process read only the documents of its own streams (every streams-th document).
    per_proc = streams // n_proc
    for p, rec in enumerate(recorders):
        own = range(p * per_proc, (p + 1) * per_proc)
        assert rec.read and rec.read <= {d for k in own for d in range(k, 64, streams)}
    assert set().union(*(r.read for r in recorders)) == set(range(64))


def test_streams_must_divide_batch():
    with pytest.raises(ValueError, match="data.streams=3"):
        make_train_iterator(_docs(10, 0), 8, 8, 0, streams=3)
    with pytest.raises(ValueError, match="fewer than data.streams=4"):
        make_train_iterator(_docs(3, 0), 8, 8, 0, streams=4)


# --- packing ---------------------------------------------------------------------------------


def test_each_stream_packs_every_token_once_per_epoch_with_right_segments():
    docs, streams, batch, seq = _docs(30, base=10_000), 2, 4, 16
    rows_per_stream = batch // streams
    batches = _take(make_train_iterator(docs, seq, batch, 11, streams=streams), 40)
    for k in range(streams):
        mine = docs[k::streams]
        expected = sorted(
            (int(a), int(b)) for d in mine for a, b in zip(d[:-1], d[1:], strict=True)
        )
        rows = {
            key: np.concatenate(
                [b[key][k * rows_per_stream : (k + 1) * rows_per_stream] for b in batches]
            )
            for key in BATCH_KEYS
        }
        assert np.all(rows["weights"] == 1.0)  # an endless stream has no padding
        stream = list(
            zip(rows["inputs"].ravel().tolist(), rows["targets"].ravel().tolist(), strict=True)
        )
        assert len(stream) >= 2 * len(expected)
        # The documented epoch boundary: the first len(expected) pairs are exactly one epoch.
        assert sorted(stream[: len(expected)]) == expected
        assert sorted(stream[len(expected) : 2 * len(expected)]) == expected
        for seg, pos, inp, tgt in zip(
            rows["segment_ids"], rows["positions"], rows["inputs"], rows["targets"], strict=True
        ):
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
            for s in np.unique(seg):
                piece = seg == s
                np.testing.assert_array_equal(pos[piece], np.arange(piece.sum()))
                # One segment, one document: no row mixes documents inside a segment.
                owners = {_doc_of(t) for t in inp[piece] if t not in (BOS, EOS)}
                owners |= {_doc_of(t) for t in tgt[piece] if t not in (BOS, EOS)}
                assert len(owners) <= 1
            # A target never starts a document: bos is only ever an input.
            assert BOS not in tgt


def test_document_longer_than_a_row_is_split_across_rows():
    long_doc = np.asarray([BOS, *range(100, 150), EOS], np.int32)
    batches = _take(make_train_iterator([long_doc], 8, 1, 0), 7)
    stream = np.concatenate([b["inputs"][0] for b in batches])
    np.testing.assert_array_equal(stream[:51], long_doc[:-1])
    # The continuation rows restart positions at 0 (a new segment piece).
    assert all(b["positions"][0, 0] == 0 for b in batches)


# --- mixtures --------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2)])
def test_mixture_token_shares_match_weights(weights):
    srcs = _mixture(weights)
    seq_len = 32
    batches = _take(make_train_iterator(srcs, seq_len, 8, 0, streams=2), 150)
    # Every target token counts for the source of its segment (bos/eos included), read off the
    # largest id in the segment: content ids >= 10^6 * (source + 1) name their source.
    seg = np.concatenate([b["segment_ids"] for b in batches])
    top = np.maximum(*(np.concatenate([b[k] for b in batches]) for k in ("inputs", "targets")))
    keys = (np.arange(seg.shape[0])[:, None] * seq_len + seg).ravel()
    _, piece = np.unique(keys, return_inverse=True)
    piece_top = np.zeros(piece.max() + 1, np.int64)
    np.maximum.at(piece_top, piece, top.ravel())
    counts = np.bincount(piece_top[piece] // 1_000_000 - 1, minlength=len(weights))
    shares = counts / counts.sum()
    # Tolerance: 4 sigma of the token share when each document's source is drawn at random
    # with probability q_s ~ weight_s / mean_length_s (how the mix draws): per draw,
    # z = (L - 1) * (1[source = s] - w_s) has mean 0, and share_s - w_s ~ sum(z) / sum(L - 1).
    n_docs = sum(int(np.sum(b["inputs"] == BOS)) for b in batches)
    q = np.array([src.weight / (src.mean_tokens - 1) for src in srcs])
    q /= q.sum()
    m1 = np.array([np.mean([len(d) - 1 for d in src.docs]) for src in srcs])  # targets
    m2 = np.array([np.mean([(len(d) - 1) ** 2 for d in src.docs]) for src in srcs])
    for s, (share, w) in enumerate(zip(shares, weights, strict=True)):
        var_z = sum(q[t] * m2[t] * ((t == s) - w) ** 2 for t in range(len(srcs)))
        sigma = np.sqrt(n_docs * var_z) / (n_docs * float(q @ m1))
        assert abs(share - w) < 4 * sigma, (s, shares, weights, sigma)
    assert n_docs > 500  # enough draws for the bound to mean something
