"""jaxlm.data.corpus: the built-in works, the train/validation split by whole works, documents
split at paragraphs, and text files read as works."""

import re

import pytest

from jaxlm.data import corpus
from jaxlm.data.corpus import Work


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
