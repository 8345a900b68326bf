"""Labelled text for classification: read TSV or JSONL, split, map labels, pad into batches.

Formats (UTF-8, one example per line, blank lines skipped):
  TSV    text<TAB>label; a first line of exactly `text<TAB>label` is a header and skipped.
         The text itself may not contain a tab.
  JSONL  {"text": "...", "label": "pos"} or {"label": 1}; files ending in .jsonl or .json.
Labels are strings or integers. Class ids follow the sorted labels (numerically when every
label is an integer), so integer labels 0..K-1 keep their values.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jaxlm.config.files import read_utf8
from jaxlm.errors import ConfigError
from jaxlm.paths import Path, as_path


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled text and the line of the file it came from."""

    text: str
    label: str
    line: int


def _label(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{where}: the label {value!r} must be a string or an integer.")
    label = str(value).strip()
    if not label:
        raise ConfigError(f"{where}: the label is empty; give every example a label.")
    return label


def read_labeled(path: str | Path) -> list[Example]:
    """Every example of a TSV or JSONL file; a malformed line raises naming its number."""
    path = as_path(path, "The labelled data file")
    if not path.is_file():
        raise ConfigError(f"The labelled data file '{path}' does not exist.")
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    out = []
    for n, raw in enumerate(read_utf8(path).split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path} line {n}"
        if jsonl:
            out.append(_json_example(line, where, n))
            continue
        cols = line.split("\t")
        if n == 1 and [c.strip().lower() for c in cols] == ["text", "label"]:
            continue  # header
        if len(cols) != 2:
            raise ConfigError(
                f"{where}: expected 2 tab-separated columns (text, label) but found "
                f"{len(cols)}; fix that line."
            )
        out.append(Example(cols[0], _label(cols[1], where), n))
    if not out:
        raise ConfigError(f"The labelled data file '{path}' holds no examples.")
    return out


def _json_example(line: str, where: str, n: int) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg}); fix that line.") from None
    if not isinstance(obj, dict):
        raise ConfigError(f'{where}: expected an object like {{"text": ..., "label": ...}}.')
    for key in ("text", "label"):
        if key not in obj:
            raise ConfigError(f'{where}: the "{key}" field is missing; add it to that line.')
    if not isinstance(obj["text"], str):
        raise ConfigError(f'{where}: "text" must be a string, got {obj["text"]!r}.')
    return Example(obj["text"], _label(obj["label"], where), n)


def split_examples(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `fraction` of the examples held out."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--validation-fraction={fraction} must be between 0 and 1.")
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise ConfigError(
            f"{len(examples)} examples are too few to hold out {fraction:.0%} for validation; "
            f"give more examples or a --validation file."
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    val = set(order[:n_val].tolist())
    return (
        [e for i, e in enumerate(examples) if i not in val],
        [e for i, e in enumerate(examples) if i in val],
    )


def label_names(examples: list[Example]) -> list[str]:
    """Class names in class-id order: numeric order if all labels are integers, else sorted."""
    names = {e.label for e in examples}
    try:
        return [str(v) for v in sorted({int(x) for x in names})]
    except ValueError:
        return sorted(names)


def _canonical(label: str) -> str:
    """Integer labels by value ("01" and "1" name one class), others as written."""
    try:
        return str(int(label))
    except ValueError:
        return label


def label_ids(examples: list[Example], labels: list[str], source: str) -> np.ndarray:
    """Class id of each example; a label unseen in training raises naming its line."""
    index = {_canonical(name): i for i, name in enumerate(labels)}
    out = np.empty(len(examples), np.int32)
    for i, e in enumerate(examples):
        key = _canonical(e.label)
        if key not in index:
            raise ConfigError(
                f"{source} line {e.line}: label {e.label!r} does not occur in the training "
                f"data ({', '.join(labels)}); fix the label or add training examples of it."
            )
        out[i] = index[key]
    return out


def encode_texts(tok, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """(bos + ids + eos per text, cut to max_len keeping eos; how many were cut)."""
    ids = tok.encode_batch(texts, bos=True, eos=True)
    cut = 0
    out = []
    for row in ids:
        if len(row) > max_len:
            row = [*row[: max_len - 1], row[-1]]
            cut += 1
        out.append(row)
    return out, cut


def batches(
    tokens: list[list[int]],
    labels: np.ndarray,
    batch_size: int,
    order: np.ndarray | None = None,
    pad_id: int = 0,
    rows: int | None = None,
):
    """Fixed-shape batches (right-padded to the longest row overall, last batch filled with
    weight-0 rows) of tokens_BxS, lengths_B, labels_B and weights_B: `batch_size` examples
    in each, in `rows` rows (default: batch_size; more adds weight-0 rows)."""
    seq = max(len(r) for r in tokens)
    order = np.arange(len(tokens)) if order is None else order
    rows = batch_size if rows is None else rows
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tok_BxS = np.full((rows, seq), pad_id, np.int32)
        len_B = np.ones(rows, np.int32)
        lab_B = np.zeros(rows, np.int32)
        w_B = np.zeros(rows, np.float32)
        for j, i in enumerate(idx):
            tok_BxS[j, : len(tokens[i])] = tokens[i]
            len_B[j], lab_B[j], w_B[j] = len(tokens[i]), labels[i], 1.0
        yield {"tokens": tok_BxS, "lengths": len_B, "labels": lab_B, "weights": w_B}


def read_texts(path: str | Path) -> list[str]:
    """Texts to label: the "text" of JSONL lines, else the first tab-separated column of
    each non-blank line (so a labelled TSV works too, its header skipped)."""
    path = as_path(path, "The input file")
    if not path.is_file():
        raise ConfigError(f"The input file '{path}' does not exist.")
    if path.suffix.lower() in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(read_utf8(path).splitlines(), start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ConfigError(f'{path} line {n}: expected an object with a "text" string.')
                out.append(obj["text"])
        return out
    lines = [ln for ln in read_utf8(path).splitlines() if ln.strip()]
    if lines and [c.strip().lower() for c in lines[0].split("\t")] == ["text", "label"]:
        lines = lines[1:]
    return [ln.split("\t")[0] for ln in lines]
