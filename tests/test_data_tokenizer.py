"""jaxlm.data.tokenizer: SentencePiece round trips, special ids, the cached built-in tokenizer,
bad paths, and `jaxlm tokenizer train`."""

import os
import re

import pytest
from conftest import tiny_texts, write_corpus

from jaxlm import cli
from jaxlm.data import corpus
from jaxlm.data.tokenizer import (
    SentencePieceTokenizer,
    load_or_train_tokenizer,
    load_tokenizer,
    train_tokenizer,
)


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
    texts = tiny_texts(n_texts=3, lines=2) + ["naïve"]
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
        load_or_train_tokenizer(missing, str(tmp_path / "c.model"), tiny_texts, 400)
    corrupt = tmp_path / "bad.model"
    corrupt.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer.load(str(corrupt))


def test_failed_training_leaves_no_files(tmp_path):
    path = tmp_path / "small.model"
    with pytest.raises(ValueError, match="100"):
        train_tokenizer(tiny_texts(2, 2), str(path), vocab_size=100)  # below 256 byte pieces
    assert os.listdir(tmp_path) == []


# --- `jaxlm tokenizer train` -----------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_train_cli_writes_model_and_vocab(tmp_path, model_type, capsys):
    write_corpus(tmp_path / "in")
    prefix = tmp_path / "out" / "tok"
    argv = ["tokenizer", "train", "--input", str(tmp_path / "in" / "*"), "--vocab-size", "400"]
    argv += ["--model-type", model_type, "--output", str(prefix)]
    argv += ["--user-defined-symbols", "<|user|>,<|end|>", "--max-sentences", "200"]
    assert cli.main(argv) == 0
    assert (tmp_path / "out" / "tok.vocab").is_file()
    tok = load_tokenizer(str(prefix) + ".model")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert len(tok.encode("<|user|>")) == 1 and len(tok.encode("<|end|>")) == 1
    text = "Kings sing\n\tnaïve 東京 🙂 <|user|>"
    assert tok.decode(tok.encode(text)) == text
    # A second run refuses to overwrite the model that data may have been prepared with.
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
