"""The arithmetic of evaluation: reading eval inputs, loss -> perplexity / bits-per-byte,
and multiple-choice rows and accuracies. No JAX here; `jaxlm.inference.evaluate` runs the model.

Bits-per-byte divides the summed next-token loss (nats) by ln 2 and by the UTF-8 bytes of
the evaluated text, so models with different tokenizers compare. The nats cover every
target token of a document: its text tokens and the closing EOS (the BOS is only ever an
input). The bytes are the UTF-8 length of the document text itself, nothing counted for
BOS/EOS or for the blank lines that separated documents in the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.config.files import read_utf8
from jaxlm.data import corpus
from jaxlm.errors import ConfigError
from jaxlm.paths import as_path


def read_documents(path: str | Path, doc_chars: int) -> list[str]:
    """Documents of a .txt file (cut at paragraph breaks) or a .jsonl file's "text" fields
    (local, gs:// or s3://)."""
    path = as_path(path, "--data")
    if not path.is_file():
        raise ConfigError(
            f"--data '{path}' is not a file; give a .txt/.jsonl file or a prepared dir."
        )
    text = read_utf8(path)
    if path.suffix != ".jsonl":
        return corpus.split_documents(text, doc_chars)
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path} line {n} is not valid JSON ({e.msg}); fix that line."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f'{path} line {n} has no string "text" field; fix that line.')
        docs.extend(corpus.split_documents(record["text"], doc_chars))
    return docs


def summarize(nats: float, tokens: float, n_bytes: int | None) -> dict[str, Any]:
    """Mean loss, perplexity, bits per token and (when bytes are known) bits per byte."""
    loss = nats / max(tokens, 1.0)
    return {
        "tokens": int(tokens),
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": None if not n_bytes else nats / math.log(2) / n_bytes,
    }


def iter_rows(token_docs: Iterable[np.ndarray], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of (inputs, targets) that score every target of every document exactly once.

    A document is never cut to fill a row: it goes whole into the next row with room, its
    own segment id keeping it apart. Only a document longer than a row is cut, into
    consecutive windows of seq_len targets, each scored without the window before it.
    Documents are read lazily, so a large prepared set is never held in memory at once.
    """
    keys = ("inputs", "targets", "segment_ids", "positions")
    row: dict[str, np.ndarray] | None = None
    used = segment = 0
    for doc in token_docs:
        doc = np.asarray(doc, np.int32)
        for lo in range(0, len(doc) - 1, seq_len):
            hi = min(lo + seq_len, len(doc) - 1)
            n = hi - lo
            if row is None or used + n > seq_len:
                if row is not None:
                    yield _finish(row)
                row = {k: np.zeros(seq_len, np.int32) for k in keys}
                used = segment = 0
            segment += 1
            row["inputs"][used : used + n] = doc[lo:hi]
            row["targets"][used : used + n] = doc[lo + 1 : hi + 1]
            row["segment_ids"][used : used + n] = segment
            row["positions"][used : used + n] = np.arange(n)
            used += n
    if row is not None:
        yield _finish(row)


def _finish(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row["weights"] = (row["segment_ids"] > 0).astype(np.float32)
    return row


def pack_rows(token_docs: Iterable[np.ndarray], seq_len: int) -> list[dict[str, np.ndarray]]:
    """All rows of `iter_rows` as a list."""
    return list(iter_rows(token_docs, seq_len))


def batches_of(rows: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Stacked batches of `size` rows; the last one filled with all-zero (weightless) rows."""
    chunk: list[dict[str, np.ndarray]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
            chunk = []
    if chunk:
        chunk += [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (size - len(chunk))
        yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}


# --------------------------------------------------------------------------- multiple choice


def read_choice_items(path: str | Path) -> list[dict[str, Any]]:
    """Items {"context": str, "choices": [str, ...], "answer": int} of a JSONL file."""
    path = as_path(path, "--multiple-choice")
    if not path.is_file():
        raise ConfigError(f"--multiple-choice '{path}' is not a file; give a JSONL file of items.")
    items = []
    lines = read_utf8(path).splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e.msg}); fix that line.") from None
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("context"), str)
            and isinstance(item.get("choices"), list)
            and len(item["choices"]) >= 2
            and all(isinstance(c, str) and c for c in item["choices"])
            and type(item.get("answer")) is int
        )
        if not ok:
            raise ConfigError(
                f'{where} needs {{"context": str, "choices": [2+ non-empty str], "answer": int}}; '
                "fix that line."
            )
        if not 0 <= item["answer"] < len(item["choices"]):
            raise ConfigError(
                f"{where} has answer {item['answer']} but {len(item['choices'])} choices; "
                "answers index the choices from 0."
            )
        items.append(item)
    if not items:
        raise ConfigError(f"--multiple-choice '{path}' holds no items; add JSONL lines.")
    return items


def choice_rows(
    context_ids: Sequence[int], choice_ids: Sequence[int], length: int
) -> dict[str, np.ndarray]:
    """One scoring row: context + choice, weights on the choice's tokens as targets.

    A row longer than `length` + 1 loses the start of its context (the choice stays whole).
    """
    tokens = list(context_ids) + list(choice_ids)
    n_ctx = len(context_ids)
    if len(tokens) > length + 1:
        drop = len(tokens) - (length + 1)
        tokens, n_ctx = tokens[drop:], max(n_ctx - drop, 1)
    n = len(tokens) - 1
    row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    row["inputs"][:n] = tokens[:-1]
    row["targets"][:n] = tokens[1:]
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    weights = np.zeros(length, np.float32)
    weights[n_ctx - 1 : n] = 1.0  # target j is token j+1: the choice starts at n_ctx
    row["weights"] = weights
    return row


def choice_accuracy(
    items: Sequence[dict[str, Any]], logliks: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """Accuracy by summed log-likelihood and by log-likelihood per UTF-8 byte of the choice."""
    correct = correct_norm = 0
    for item, ll in zip(items, logliks, strict=True):
        ll = np.asarray(ll, np.float64)
        n_bytes = np.asarray([len(c.encode("utf-8")) for c in item["choices"]], np.float64)
        correct += int(np.argmax(ll)) == item["answer"]
        correct_norm += int(np.argmax(ll / n_bytes)) == item["answer"]
    n = len(items)
    return {"items": n, "acc": correct / n, "acc_norm": correct_norm / n}
