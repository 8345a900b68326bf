"""Text corpora: the built-in Shakespeare works, user text files, documents and splits."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import lzma
import os
import random
import re
from collections.abc import Sequence

from jaxlm import paths
from jaxlm.config.files import decode_error, read_utf8
from jaxlm.data.sources import match_files
from jaxlm.errors import ConfigError

_BUILTIN_PACKAGE = "jaxlm.data"
_BUILTIN_FILE = ("corpus", "shakespeare.jsonl.xz")

# A blank line is a newline, optional whitespace, and another newline. The pattern ends on the
# last newline so the next paragraph keeps its own leading indentation (verse is indented).
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclasses.dataclass(frozen=True)
class Work:
    """One whole text (a play, a poem, a user file): the unit of the train/validation split."""

    name: str
    title: str
    text: str


def load_builtin_works() -> list[Work]:
    """Return the 42 built-in works of Shakespeare, in the stored order."""
    # importlib.resources finds the file inside an installed wheel or zip as well as a checkout.
    resource = importlib.resources.files(_BUILTIN_PACKAGE).joinpath(*_BUILTIN_FILE)
    with resource.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return [Work(name=r["name"], title=r["title"], text=r["text"]) for r in records]


def read_text_works(pattern: str) -> list[Work]:
    """Return one work per UTF-8 text file matching a glob pattern (local, gs:// or s3://),
    sorted by path."""
    files = sorted(match_files(pattern))
    if not files:
        raise ConfigError(
            f"No files match the text pattern {pattern!r}; point it at existing UTF-8 text files "
            "(e.g. 'corpus/**/*.txt', quoted so the shell does not expand it)."
        )
    works = []
    for path in files:
        text = _read_remote_utf8(path) if paths.is_remote(path) else read_utf8(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        works.append(Work(name=stem, title=stem, text=text))
    return works


def _read_remote_utf8(path: str) -> str:
    data = paths.as_path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None


def split_documents(text: str, target_chars: int = 2000) -> list[str]:
    """Cut a text into documents of whole paragraphs, each about `target_chars` long."""
    if target_chars <= 0:
        raise ConfigError(f"target_chars={target_chars} must be positive; use e.g. 2000.")
    paragraphs = [p.rstrip() for p in _PARAGRAPH_BREAK.split(text.strip("\n")) if p.strip()]
    documents: list[str] = []
    current: list[str] = []
    current_chars = 0
    for paragraph in paragraphs:
        # Two characters for the blank line that rejoins paragraphs inside a document.
        grown = current_chars + (2 if current else 0) + len(paragraph)
        if current and grown > target_chars:
            documents.append("\n\n".join(current))
            current, current_chars = [], 0
            grown = len(paragraph)
        current.append(paragraph)
        current_chars = grown
    if current:
        documents.append("\n\n".join(current))
    return documents


def train_validation_split(
    works: Sequence[Work], validation_fraction: float, seed: int
) -> tuple[list[Work], list[Work]]:
    """Hold out whole works for validation; the same seed always picks the same works."""
    if len(works) < 2:
        raise ConfigError(
            f"Cannot hold out whole works from {len(works)} work(s); give at least two works "
            "(e.g. two text files) so each side of the split gets one."
        )
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(
            f"validation_fraction={validation_fraction} must lie strictly between 0 and 1; "
            "use e.g. 0.05."
        )
    # Whole works, never lines: lines of one play are highly correlated, so a line-level split
    # would leak the validation text into training and flatter the validation loss.
    n_validation = min(max(round(len(works) * validation_fraction), 1), len(works) - 1)
    order = list(range(len(works)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_validation])
    train = [w for i, w in enumerate(works) if i not in held_out]
    validation = [w for i, w in enumerate(works) if i in held_out]
    return train, validation
