"""jaxlm.data.streams and text_cache: with the default stream count every process count that
divides the batch builds streams of its own, the data order survives resizing the job, old
runs keep their stream count, and an in-memory text corpus is tokenized once."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import RecordingDocs, assert_same_batches, numbered_docs, tiny_texts
from jax.experimental import multihost_utils

from jaxlm.config import load_config
from jaxlm.data import pipeline, text_cache
from jaxlm.data.dataset import prepare_corpus
from jaxlm.data.pipeline import BATCH_KEYS, WeightedSource, make_train_iterator
from jaxlm.data.streams import default_streams, resolve_streams
from jaxlm.errors import ConfigError


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


# --- every process count gets streams of its own ---------------------------------------------


@pytest.mark.parametrize("n_proc", [1, 2, 4, 8, 16])
def test_default_streams_are_never_built_by_two_processes(n_proc):
    docs, batch, steps = numbered_docs(96, base=0), 16, 12
    streams = default_streams(batch, len(docs), prepared=True)
    assert streams == batch  # one stream per row
    whole = _take(make_train_iterator(docs, 12, batch, 3, streams=streams), steps)
    parts, built, recorders = [], [], []
    for p in range(n_proc):
        rec = RecordingDocs(docs)
        it = make_train_iterator(
            rec, 12, batch, 3, shard_index=p, shard_count=n_proc, streams=streams
        )
        parts.append(_take(it, steps))
        built.append(set(it.get_state()["streams"]))  # the global indices it packs
        recorders.append(rec)
    # The processes' rows, in order, are the global batch.
    for step in range(steps):
        for k in BATCH_KEYS:
            joined = np.concatenate([part[step][k] for part in parts])
            np.testing.assert_array_equal(joined, whole[step][k])
    # Every stream is packed by exactly one process, and no document is read by two.
    assert sum(len(b) for b in built) == streams
    assert set().union(*built) == {str(k) for k in range(streams)}
    for a in range(n_proc):
        for b in range(a + 1, n_proc):
            assert not recorders[a].read & recorders[b].read


def test_default_stream_count_is_a_divisor_the_data_can_fill():
    assert default_streams(16, 1000, prepared=True) == 16
    assert default_streams(16, 5, prepared=True) == 4  # every stream needs a document
    assert default_streams(12, 7, prepared=True) == 6
    assert default_streams(16, 1000, prepared=False) == 1  # in-memory text: as before


def _sources():
    out = []
    for s, w in enumerate((0.6, 0.4)):
        docs = numbered_docs(40 + 8 * s, base=1_000_000 * (s + 1), lo=3, hi=25, seed=s)
        out.append(WeightedSource(docs, w, f"src{s}", float(np.mean([len(d) for d in docs]))))
    return out


def test_resume_on_2_then_1_then_4_processes_continues_the_same_batches():
    # Elastic resume at the pipeline level: the states the processes save are merged (as the
    # checkpointer merges process_I-of-N.json files) and restore any other process count.
    srcs, batch, seq = _sources(), 8, 16
    streams = default_streams(batch, min(len(s.docs) for s in srcs), prepared=True)
    reference = _take(make_train_iterator(srcs, seq, batch, 7, streams=streams), 12)

    def run(n_proc, saved, steps):
        its = [
            make_train_iterator(
                srcs, seq, batch, 7, shard_index=p, shard_count=n_proc, streams=streams
            )
            for p in range(n_proc)
        ]
        if saved is not None:
            for it in its:
                it.set_state({"streams": saved})
        out = []
        for _ in range(steps):
            rows = [next(it) for it in its]
            out.append({k: np.concatenate([r[k] for r in rows]) for k in BATCH_KEYS})
        merged = {}
        for it in its:
            merged.update(json.loads(json.dumps(it.get_state()))["streams"])
        return out, merged

    first, saved = run(2, None, 4)
    second, saved = run(1, saved, 3)
    third, _ = run(4, saved, 5)
    assert_same_batches(first + second + third, reference)


# --- the stream count of a run that has checkpoints ------------------------------------------


def _position(workdir, step, states, of=None):
    """Data-iterator files of checkpoint `step`, one per process, as Grain writes them."""
    d = workdir / "checkpoints" / str(step) / "data_iter"
    d.mkdir(parents=True)
    for i, state in enumerate(states):
        (d / f"process_{i}-of-{of or len(states)}.json").write_text(json.dumps(state))


def _streams(*indices):
    return {"streams": {str(k): {"parent_state": {}} for k in indices}}


def test_a_run_keeps_the_stream_count_its_checkpoints_hold(tmp_path):
    assert resolve_streams(None, 16, 100, True, tmp_path) == 16  # a new run
    assert resolve_streams(2, 16, 100, True, tmp_path) == 2
    # Saved by 2 processes with the earlier default, gcd(16, 8) = 8 streams: kept.
    _position(tmp_path, 10, [_streams(0, 1, 2, 3), _streams(4, 5, 6, 7)])
    assert resolve_streams(None, 16, 100, True, tmp_path) == 8
    # A newer step missing one of its files tells nothing; the older complete one decides.
    _position(tmp_path, 20, [_streams(0)], of=2)
    assert resolve_streams(None, 16, 100, True, tmp_path) == 8
    with pytest.raises(ConfigError, match=r"data.streams=16 .* set data.streams=8"):
        resolve_streams(16, 16, 100, True, tmp_path)


def test_positions_of_earlier_versions(tmp_path):
    # One stream, its state saved unwrapped (as the fixture runs of tests/test_runs.py hold).
    _position(tmp_path / "a", 2, [{"parent_state": {"next_index": 0}}])
    assert resolve_streams(None, 16, 100, True, tmp_path / "a") == 1
    # Per-process lists do not name their streams: the earlier default applies.
    _position(tmp_path / "b", 2, [{"streams": [{}, {}]}, {"streams": [{}, {}]}])
    assert resolve_streams(None, 16, 100, True, tmp_path / "b") == 8
    assert resolve_streams(None, 16, 100, False, tmp_path / "b") == 1


# --- an in-memory text corpus is tokenized once ----------------------------------------------


@pytest.fixture
def text_run(tmp_path, tiny_tok):
    """A text-corpus config and its run directory."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, text in enumerate(tiny_texts()):
        (root / f"w{i}.txt").write_text(text, encoding="utf-8")
    cfg = load_config(
        None,
        [
            f"data.corpus={root}/*.txt",
            f"data.tokenizer={tiny_tok.path}",
            "model.vocab_size=400",
            "data.doc_chars=300",
            "data.validation_fraction=0.3",
            "train.batch_size=4",
            "data.seq_len=16",
        ],
    )
    return cfg, tmp_path / "run", root


def _no_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds the token ids")

    monkeypatch.setattr(text_cache, "tokenize_documents", refuse)
    monkeypatch.setattr(pipeline, "tokenize_documents", refuse)


def _assert_same_docs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, y)


def _batches(c):
    return _take(make_train_iterator(c.train_docs, 16, 4, 0, streams=c.streams), 6)


def test_text_corpus_is_tokenized_once_then_read_back(text_run, monkeypatch):
    cfg, run, root = text_run
    first = prepare_corpus(cfg, run)
    assert first.streams == 1
    assert len(list((run / "tokens").iterdir())) == 1
    with monkeypatch.context() as m:
        _no_tokenizing(m)
        again = prepare_corpus(cfg, run)  # a resumed run reads the cache
    _assert_same_docs(again.train_docs, first.train_docs)
    _assert_same_docs(again.val_docs, first.val_docs)
    assert_same_batches(_batches(again), _batches(first))
    # A changed corpus is tokenized again, into a directory of its own.
    (root / "w0.txt").write_text("Entirely new words.\n" * 40, encoding="utf-8")
    changed = prepare_corpus(cfg, run)
    assert len(list((run / "tokens").iterdir())) == 2
    assert sum(map(len, changed.train_docs + changed.val_docs)) != sum(
        map(len, first.train_docs + first.val_docs)
    )


def test_other_processes_wait_for_process_zero_and_read_its_tokens(text_run, monkeypatch):
    cfg, run, _ = text_run
    zero = prepare_corpus(cfg, run)
    barriers = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    with monkeypatch.context() as m:
        _no_tokenizing(m)
        one = prepare_corpus(cfg, run)
    assert barriers == ["jaxlm_text_tokens"]
    _assert_same_docs(one.train_docs, zero.train_docs)
    _assert_same_docs(one.val_docs, zero.val_docs)
    # Hosts that share no disk find no cache after the barrier and tokenize for themselves.
    for d in (run / "tokens").iterdir():
        for split in ("train", "val"):
            (d / split / "manifest.json").unlink()
    alone = prepare_corpus(cfg, run)
    assert len(barriers) == 2
    _assert_same_docs(alone.train_docs, zero.train_docs)
