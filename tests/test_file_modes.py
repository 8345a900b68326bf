"""Files jaxlm writes take the user's umask (0644 under umask 022), not the 0600 / 0700 of
temporary files renamed into place."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import tiny_texts

from jaxlm.data.prepare import prepare
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.hf.convert import _new_output


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_tokenizer_and_shards_are_world_readable(tmp_path, umask_022):
    texts = tiny_texts()
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    tok = tmp_path / "tok" / "t.model"
    train_tokenizer(texts, str(tok), vocab_size=400)
    out = tmp_path / "shards"
    prepare([str(tmp_path / "*.txt")], str(tok), out, workers=1, progress=False)
    written = [tok, tok.with_suffix(".vocab"), *sorted(out.iterdir())]
    assert len(written) > 3
    for path in written:
        assert _mode(path) == 0o644, f"{path.name} has mode {_mode(path):o}"


def test_conversion_output_directory_takes_the_umask(tmp_path, umask_022):
    assert _mode(_new_output(tmp_path / "converted")) == 0o755
