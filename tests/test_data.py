"""Tests for jaxlm.data: corpus, tokenizer, Grain packing pipeline."""

import json
import os
import random
import re

import numpy as np
import pytest

from jaxlm.data import corpus
from jaxlm.data.corpus import Work
from jaxlm.data.pipeline import (
    BATCH_KEYS,
    make_eval_batches,
    make_train_iterator,
    tokenize_documents,
)
from jaxlm.data.tokenizer import SentencePieceTokenizer, load_or_train_tokenizer, train_tokenizer
from jaxlm.data.tokenizer_base import Tokenizer

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly banjo "
    "players and then they sing of kings, queens, swords; what light through yonder window"
).split()


def _tiny_texts(n_texts: int = 10, lines: int = 20) -> list[str]:
    rng = random.Random(0)
    return [
        "\n".join(
            " ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + "." for _ in range(lines)
        )
        for _ in range(n_texts)
    ]


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    return train_tokenizer(_tiny_texts(), str(path), vocab_size=400)


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  Indented verse,\n\n\tand a tab;  double  spaces.\n",
        "naïve 東京 🙂",
        "",
    ],
)
def test_tokenizer_round_trip(tiny_tok, text):
    assert tiny_tok.decode(tiny_tok.encode(text)) == text


def test_tokenizer_special_ids_and_pad_ignored(tiny_tok):
    assert (tiny_tok.pad_id, tiny_tok.unk_id, tiny_tok.bos_id, tiny_tok.eos_id) == (0, 1, 2, 3)
    ids = tiny_tok.encode("a lazy dog", bos=True, eos=True)
    assert ids[0] == 2 and ids[-1] == 3
    assert tiny_tok.decode(ids + [0, 0, 0]) == "a lazy dog"
    # Characters never seen in training fall back to bytes, not to unk.
    assert tiny_tok.unk_id not in tiny_tok.encode("東京 🙂")


def test_encode_batch_matches_encode(tiny_tok):
    texts = _tiny_texts(n_texts=3, lines=2) + ["naïve"]
    assert tiny_tok.encode_batch(texts, eos=True) == [tiny_tok.encode(t, eos=True) for t in texts]


def test_builtin_tokenizer_cache_and_mismatch(tmp_path):
    cache = str(tmp_path / "cache" / "spm_2048.model")
    tok = load_or_train_tokenizer(
        None, cache, lambda: (w.text for w in corpus.load_builtin_works()), 2048
    )
    assert tok.vocab_size == 2048 and os.path.exists(cache)
    assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")] == []  # no temp left
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n  Deny thy father."
    assert tok.decode(tok.encode(text)) == text
    mtime = os.stat(cache).st_mtime_ns

    def must_not_train():
        raise AssertionError("the cached tokenizer should have been reused")

    again = load_or_train_tokenizer(None, cache, must_not_train, 2048)
    assert again.sha256 == tok.sha256 and os.stat(cache).st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"2048.*1024|1024.*2048"):
        load_or_train_tokenizer(None, cache, must_not_train, 1024)
    # An explicit path wins over the cache, and is checked the same way.
    with pytest.raises(ValueError, match="1000"):
        load_or_train_tokenizer(cache, str(tmp_path / "other.model"), must_not_train, 1000)


def test_missing_or_corrupt_tokenizer_path(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ValueError, match=re.escape(missing)):
        load_or_train_tokenizer(missing, str(tmp_path / "c.model"), _tiny_texts, 400)
    corrupt = tmp_path / "bad.model"
    corrupt.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer.load(str(corrupt))


def test_failed_training_leaves_no_files(tmp_path):
    path = tmp_path / "small.model"
    with pytest.raises(ValueError, match="100"):
        train_tokenizer(_tiny_texts(2, 2), str(path), vocab_size=100)  # below 256 byte pieces
    assert os.listdir(tmp_path) == []


# --- corpus ----------------------------------------------------------------------------------


def test_builtin_works_and_split():
    works = corpus.load_builtin_works()
    assert len(works) == 42
    assert len({w.name for w in works}) == 42 and all(len(w.text) > 1000 for w in works)
    train, val = corpus.train_validation_split(works, 0.1, seed=0)
    assert train and val and len(train) + len(val) == 42
    assert {w.name for w in train}.isdisjoint(w.name for w in val)  # whole works only
    assert corpus.train_validation_split(works, 0.1, seed=0) == (train, val)
    other_seeds = [corpus.train_validation_split(works, 0.1, seed=s)[1] for s in range(1, 4)]
    assert any(v != val for v in other_seeds)


def test_split_needs_two_works():
    with pytest.raises(ValueError, match="1 work"):
        corpus.train_validation_split([Work("a", "A", "text")], 0.5, seed=0)
    two = [Work("a", "A", "x"), Work("b", "B", "y")]
    train, val = corpus.train_validation_split(two, 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1


def test_split_documents_keeps_all_text():
    text = corpus.load_builtin_works()[0].text
    docs = corpus.split_documents(text, target_chars=2000)
    assert len(docs) > 10
    assert " ".join(docs).split() == text.split()  # only whitespace between paragraphs may go
    assert re.sub(r"\s", "", "".join(docs)) == re.sub(r"\s", "", text)
    long_paragraph = "word " * 1000
    docs = corpus.split_documents(f"short one\n\n{long_paragraph}\n  \n\nshort two", 100)
    assert docs == ["short one", long_paragraph.rstrip(), "short two"]
    assert all(len(d) <= 2000 or "\n\n" not in d for d in corpus.split_documents(text))


def test_read_text_works(tmp_path):
    (tmp_path / "b.txt").write_text("Bee text 東京", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Ay text", encoding="utf-8")
    works = corpus.read_text_works(str(tmp_path / "*.txt"))
    assert [(w.name, w.text) for w in works] == [("a", "Ay text"), ("b", "Bee text 東京")]
    with pytest.raises(ValueError, match=re.escape("*.md")):
        corpus.read_text_works(str(tmp_path / "*.md"))


# --- pipeline --------------------------------------------------------------------------------


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


def _take(it, n):
    return [next(it) for _ in range(n)]


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
