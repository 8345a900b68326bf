"""jaxlm.data.labeled: classification files (TSV, JSON Lines) with bad lines named by number,
label names and ids, and the seeded train/validation split."""

from __future__ import annotations

import json

import pytest

from jaxlm.data.labeled import label_ids, label_names, read_labeled, split_examples
from jaxlm.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "content", "line", "words"),
    [
        ("d.tsv", "text\tlabel\ngood day\tpos\nbad\tday\tneg\n", 3, "found 3"),
        ("d.tsv", "good day\tpos\nno label here\n", 2, "found 1"),
        ("d.tsv", "good day\tpos\nbad day\t \n", 2, "label is empty"),
        ("d.jsonl", '{"text": "good", "label": 1}\n{"text": "bad"}\n', 2, '"label" field'),
        ("d.jsonl", '{"text": "good", "label": 1}\n\n{"text": "x", "label": 0\n', 3, "JSON"),
        ("d.jsonl", '{"text": "good", "label": true}\n', 1, "string or an integer"),
    ],
)
def test_bad_lines_are_reported_with_their_number(tmp_path, name, content, line, words):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        read_labeled(path)
    msg = str(exc.value)
    assert f"line {line}:" in msg and words in msg and "\n" not in msg


def test_labels_map_and_split_is_seeded(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "label": i % 3 * 5} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = read_labeled(path)
    names = label_names(examples)
    assert names == ["0", "5", "10"]  # numeric order, not string order
    assert label_ids(examples[:3], names, str(path)).tolist() == [0, 1, 2]
    a = split_examples(examples, 0.2, seed=3)
    b = split_examples(examples, 0.2, seed=3)
    assert a == b and len(a[1]) == 6 and not set(a[0]) & set(a[1])
    assert split_examples(examples, 0.2, seed=4)[1] != a[1]
    with pytest.raises(ConfigError, match="line 1: label 'x'"):
        label_ids([examples[0].__class__("t", "x", 1)], names, "val.tsv")
