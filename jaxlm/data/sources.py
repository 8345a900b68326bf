"""Raw text inputs for tokenizer training and corpus preparation: files -> documents.

Formats, chosen by file name (a trailing `.gz` is decompressed first):
  *.jsonl, *.json   one JSON object per line; the document is the string under `text_field`
  *.parquet, *.arrow, *.array_record, and Hugging Face `save_to_disk` directories
                    see formats.py
  anything else     UTF-8 text: the whole file is one document, or with split="blank-lines"
                    each run of lines between blank lines is one

A `DocFilter` (filters.py) drops documents by length and by record field; what it drops is
counted in `SkipCounts` like bad input.

Inputs may be gs:// or s3:// URLs (globs included); they are streamed from the store.

Bad input that loses only part of the data is skipped and counted in `SkipCounts` (the caller
prints and records the counts); input that can only be a mistake raises ConfigError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import os
import re
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import fsspec

from jaxlm import paths
from jaxlm.data import formats
from jaxlm.data.filters import FILTER_REASONS, NO_FILTER, DocFilter
from jaxlm.errors import ConfigError

SPLITS = ("file", "blank-lines")
_BLANK_LINES = re.compile(r"\n\s*\n")  # greedy: a run of blank lines is one break
SKIP_REASONS = ("empty", "invalid_utf8", "bad_json", "missing_field", *FILTER_REASONS)


@dataclasses.dataclass
class SkipCounts:
    """Documents (or JSONL lines) left out, by reason, with the first place each was seen."""

    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0)
    )
    first: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        """Count one skipped item and remember where the first of its kind was."""
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def total(self) -> int:
        """All skipped items."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason that occurred, e.g. 'skipped 2 empty (first: a.txt)'."""
        return "\n".join(
            f"skipped {n} {reason.replace('_', ' ')} item(s) (first: {self.first[reason]})"
            for reason, n in self.counts.items()
            if n
        )


def match_files(pattern: str) -> list[str]:
    """Files (not directories) matching a glob or plain path, local or gs:// / s3://: local
    ones as given (user-expanded), remote ones as URLs; unsorted, maybe empty."""
    if not paths.is_remote(pattern):
        matched = glob.glob(os.path.expanduser(pattern), recursive=True)
        return [p for p in matched if os.path.isfile(p)]
    paths.as_path(pattern, "The input")  # a missing client library is a ConfigError
    fs, _ = fsspec.core.url_to_fs(pattern)
    prefix = f"{paths.scheme(pattern)}://"
    found = fs.glob(pattern, detail=True)
    return [prefix + p.removeprefix(prefix) for p, info in found.items() if info["type"] == "file"]


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated files matching glob patterns (or plain paths, or Hugging Face
    dataset directories, which stand for their Arrow files); error if none."""
    found: set[str] = set()
    for pattern in patterns:
        files = formats.dataset_dir_files(pattern) or match_files(pattern)
        if not files:
            raise ConfigError(
                f"No files match the input {pattern!r}; give existing files or a quoted glob "
                "such as 'corpus/**/*.jsonl.gz'."
            )
        found.update(p if paths.is_remote(p) else os.path.abspath(p) for p in files)
    formats.check_libraries(found)
    return sorted(found)


def is_jsonl(path: str) -> bool:
    """True for .jsonl / .json files, compressed or not."""
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json"))


@contextlib.contextmanager
def _open_bytes(path: str) -> Iterator[BinaryIO]:
    if not paths.is_remote(path):
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            yield f
        return
    with paths.as_path(path).open("rb") as raw:
        if not path.endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield f


def _read_all(path: str) -> bytes:
    try:
        with _open_bytes(path) as f:
            return f.read()
    except (OSError, EOFError) as e:  # a truncated or non-gzip .gz lands here
        raise ConfigError(f"Cannot read {path!r} ({e}); fix or remove the file.") from e


def _text_documents(
    path: str, split: str, doc_filter: DocFilter, skips: SkipCounts
) -> Iterator[str]:
    check_filter([path], doc_filter)
    raw = _read_all(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # One stray byte usually means a wrong encoding for the whole file: skip it rather than
        # train on mojibake, and say where.
        skips.add("invalid_utf8", f"{path} at byte {e.start}")
        return
    if not text.strip():
        skips.add("empty", path)
        return
    if split == "file":
        if doc_filter.admit(text, path, skips):
            yield text
        return
    for number, piece in enumerate(_BLANK_LINES.split(text), 1):
        if piece.strip() and doc_filter.admit(piece.strip("\n"), f"{path} block {number}", skips):
            yield piece.strip("\n")


def _jsonl_documents(
    path: str, text_field: str, doc_filter: DocFilter, skips: SkipCounts
) -> Iterator[str]:
    lines = 0
    missing = 0
    malformed = 0
    try:
        with _open_bytes(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                lines += 1
                outcome, text = formats.json_record(
                    line, f"{path}:{number}", text_field, doc_filter, skips
                )
                malformed += outcome == "bad_json"
                missing += outcome == "missing_field"
                if text is not None:
                    yield text
    except (OSError, EOFError) as e:
        raise ConfigError(f"Cannot read {path!r} ({e}); fix or remove the file.") from e
    if lines == 0:
        skips.add("empty", path)
    elif malformed == lines and lines > 1:
        # Not one line parses: a pretty-printed JSON document or another format, not JSONL.
        raise ConfigError(
            f"No line of {path!r} is a JSON object; give JSON Lines (one object per line) or "
            "rename the file so it is read as plain text."
        )
    elif missing == lines:
        # Not one line has the field: the field name is wrong, not the data.
        raise ConfigError(
            f"None of the {lines} lines of {path!r} has a string field {text_field!r}; set "
            "--text-field to the key that holds the text."
        )


def check_filter(files: Sequence[str], doc_filter: DocFilter) -> None:
    """Refuse a field condition when a file is plain text (it has no fields), before any work."""
    if not doc_filter.where:
        return
    for path in files:
        if not formats.file_format(path) and not is_jsonl(path):
            raise ConfigError(
                f"--where filters records by field, but {path!r} is plain text; drop --where "
                "or give JSONL, Parquet or Arrow files."
            )


_READERS = {
    "parquet": formats.parquet_documents,
    "arrow": formats.arrow_documents,
    "array_record": formats.array_record_documents,
}


def iter_documents(
    path: str,
    split: str = "file",
    text_field: str = "text",
    skips: SkipCounts | None = None,
    doc_filter: DocFilter = NO_FILTER,
) -> Iterator[str]:
    """Documents of one file that pass `doc_filter`, in file order; skipped items (bad or
    filtered out) are counted into `skips`."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not known; use one of {', '.join(SPLITS)}.")
    skips = skips if skips is not None else SkipCounts()
    reader = _READERS.get(formats.file_format(path))
    if reader is not None:
        return reader(path, text_field, doc_filter, skips)
    if is_jsonl(path):
        return _jsonl_documents(path, text_field, doc_filter, skips)
    return _text_documents(path, split, doc_filter, skips)


def source_record(path: str) -> dict[str, object]:
    """Path, size and modification time of an input file, for the manifest."""
    if paths.is_remote(path):
        info = paths.as_path(path).stat()  # the store keeps whole seconds at best
        return {"path": path, "size": info.length, "mtime_ns": int(info.mtime) * 10**9}
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
