"""Columnar and record inputs for corpus preparation: Parquet, Arrow, ArrayRecord -> documents.

Formats, chosen by file name (`sources.iter_documents` dispatches here):
  *.parquet            the string column `text_field` (`--text-column`), read one record
                       batch at a time, only the columns needed, without pre-buffering: memory
                       stays at about one row group of those columns whatever the file's size
  *.arrow              Arrow IPC, stream or file format: what Hugging Face `save_to_disk`
                       writes as data-NNNNN-of-NNNNN.arrow; a directory with its state.json
                       expands to those files (`dataset_dir_files`)
  *.array_record[-NNNNN-of-NNNNN]
                       one document per record; each file is read as JSON objects (the text
                       under `text_field`) when its first non-empty record is one, else as
                       UTF-8 text records; serialized protos are refused

pyarrow is the optional `jaxlm[parquet]` extra and array_record the `jaxlm[arrayrecord]`
extra, so both are imported where they are needed. Inputs may be gs:// or s3:// URLs:
Parquet and Arrow are read through a seekable store file, ArrayRecord (whose reader opens
only local files) from a copy in the local object cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from jaxlm import paths
from jaxlm.data.filters import DocFilter, Skips, missing
from jaxlm.errors import ConfigError

BATCH_ROWS = 512  # rows converted to Python at a time: bounded memory, amortised conversion
RECORDS_PER_READ = 512
READ_BUFFER = 4 << 20  # bytes per Parquet read: few requests to a store, little memory
_ARRAY_RECORD = re.compile(r"\.array_?record(-\d+-of-\d+)?$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def file_format(path: str) -> str:
    """'parquet', 'arrow', 'array_record', or '' for the text and JSONL formats of sources.py."""
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    if _ARRAY_RECORD.search(path):
        return "array_record"
    return ""


def _reason(e: BaseException) -> str:
    """A library's error message as one clause: first line, no sentence breaks."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return re.sub(r"[.!?]+(\s+|$)", "; ", lines[0]).strip("; ")[:200]


def _unreadable(path: str, kind: str, e: BaseException) -> ConfigError:
    return ConfigError(f"Cannot read {path!r} as {kind} ({_reason(e)}); fix or remove the file.")


def check_libraries(files: Iterable[str]) -> None:
    """Fail before any work when a file's format needs a library that is not installed."""
    for path in files:
        kind = file_format(path)
        if kind in ("parquet", "arrow"):
            _pyarrow(path)
        elif kind == "array_record":
            _array_record_module(path)


def _pyarrow(path: str) -> Any:
    try:
        import pyarrow  # the optional jaxlm[parquet] extra
    except ImportError:
        raise ConfigError(
            f'Reading {path!r} needs pyarrow; install it with pip install "jaxlm[parquet]".'
        ) from None
    return pyarrow


@contextlib.contextmanager
def _open(path: str, pa: Any) -> Iterator[Any]:
    """A pyarrow input file: native for local paths, the store's seekable file for URLs."""
    if paths.is_remote(path):
        with paths.as_path(path, "The input").open("rb") as f:
            yield pa.PythonFile(f, mode="r")
        return
    with pa.OSFile(path, "rb") as f:
        yield f


# --- Hugging Face save_to_disk directories ----------------------------------------------------


def dataset_dir_files(pattern: str) -> list[str] | None:
    """The Arrow files of a Hugging Face `save_to_disk` directory, in their order; None when
    `pattern` is not such a directory."""
    if _GLOB_CHARS.search(pattern):
        return None
    text = pattern if paths.is_remote(pattern) else os.path.expanduser(pattern)
    root = paths.as_path(text.rstrip("/") or "/", "The input")
    if (root / "dataset_dict.json").is_file():
        try:
            splits = json.loads(paths.read_text(root / "dataset_dict.json"))["splits"]
        except (ValueError, KeyError, TypeError):
            splits = ["train"]
        raise ConfigError(
            f"{pattern!r} holds a dataset with the splits {', '.join(map(str, splits))}; give "
            f"one split's directory, e.g. {os.fspath(root / str(splits[0]))}."
        )
    state = root / "state.json"
    if not state.is_file():
        return None
    try:
        names = [f["filename"] for f in json.loads(paths.read_text(state))["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{os.fspath(state)!r} is not a Hugging Face dataset state file ({_reason(e)}); "
            "save the dataset again with save_to_disk."
        ) from None
    files = [os.fspath(root / name) for name in names]
    for name in files:
        if not paths.as_path(name).is_file():
            raise ConfigError(
                f"{os.fspath(state)!r} lists {name!r}, which is missing; copy the whole "
                "dataset directory again."
            )
    return files


# --- record batches (Parquet, Arrow) ----------------------------------------------------------


def _check_columns(path: str, schema: Any, text_field: str, doc_filter: DocFilter, pa: Any):
    """The columns to read; a missing or non-string text column is a ConfigError."""
    names = list(schema.names)
    shown = ", ".join(map(repr, names[:12])) + (", ..." if len(names) > 12 else "")
    if text_field not in names:
        raise ConfigError(
            f"{path!r} has no column {text_field!r} (its columns: {shown}); set --text-column "
            "to the column that holds the text."
        )
    kind = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise ConfigError(
            f"The column {text_field!r} of {path!r} holds {kind}, not strings; set "
            "--text-column to the column that holds the text."
        )
    for key in doc_filter.where:
        if key not in names:
            raise ConfigError(
                f"--where {key}=... names no column of {path!r} (its columns: {shown}); "
                "filter on one of them."
            )
    return [text_field, *(k for k in doc_filter.where if k != text_field)]


def _batch_documents(
    path: str,
    batches: Iterable[Any],
    text_field: str,
    doc_filter: DocFilter,
    skips: Skips,
    kind: str,
    pa: Any,
) -> Iterator[str]:
    row = 0
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError) as e:  # a damaged page or batch
            raise _unreadable(path, kind, e) from None
        # One batch at a time as Python objects: the only copy of the text this reader holds.
        texts = batch.column(text_field).to_pylist()
        fields = {k: batch.column(k).to_pylist() for k in doc_filter.where}
        for i, text in enumerate(texts):
            where = f"{path}:row {row + i}"
            row_fields = {key: column[i] for key, column in fields.items()}
            if not doc_filter.keep_record(row_fields.__getitem__):
                skips.add("filtered_out", where)
            elif text is None:
                skips.add("missing_field", where)
            elif doc_filter.admit(text, where, skips):
                yield text
        row += batch.num_rows
    if row == 0:
        skips.add("empty", path)


def parquet_documents(
    path: str, text_field: str, doc_filter: DocFilter, skips: Skips
) -> Iterator[str]:
    """The texts of a Parquet file's `text_field` column, in row order."""
    pa = _pyarrow(path)
    import pyarrow.parquet as pq  # the optional jaxlm[parquet] extra

    with _open(path, pa) as f:
        try:
            # pre_buffer (pyarrow's default) fetches every row group ahead: measured, the
            # whole file in memory; unbuffered reads in 4 MB blocks keep one row group.
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _unreadable(path, "Parquet", e) from None
        columns = _check_columns(path, pf.schema_arrow, text_field, doc_filter, pa)
        batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        yield from _batch_documents(path, batches, text_field, doc_filter, skips, "Parquet", pa)


def arrow_documents(
    path: str, text_field: str, doc_filter: DocFilter, skips: Skips
) -> Iterator[str]:
    """The texts of an Arrow IPC file's (stream or file format) `text_field` column."""
    pa = _pyarrow(path)
    import pyarrow.ipc  # the optional jaxlm[parquet] extra

    with _open(path, pa) as f:
        try:
            # The file format starts with this magic; save_to_disk writes the stream format.
            if f.read(6) == b"ARROW1":
                f.seek(0)
                reader = pyarrow.ipc.open_file(f)
                batches: Iterable[Any] = (
                    reader.get_batch(i) for i in range(reader.num_record_batches)
                )
            else:
                f.seek(0)
                reader = batches = pyarrow.ipc.open_stream(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _unreadable(path, "Arrow IPC", e) from None
        _check_columns(path, reader.schema, text_field, doc_filter, pa)
        yield from _batch_documents(path, batches, text_field, doc_filter, skips, "Arrow IPC", pa)


# --- JSON records (JSONL lines, ArrayRecord records) ------------------------------------------


def json_record(
    raw: bytes, where: str, text_field: str, doc_filter: DocFilter, skips: Skips
) -> tuple[str, str | None]:
    """(outcome, text) of one JSON-object record; outcome is 'ok' (text set), 'bad_json',
    'missing_field' or 'skipped' (counted into `skips` in every case but 'ok')."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        skips.add("invalid_utf8", where)
        return "skipped", None
    except json.JSONDecodeError:
        skips.add("bad_json", where)
        return "bad_json", None
    if not isinstance(record, dict):
        skips.add("bad_json", where)
        return "bad_json", None
    if not doc_filter.keep_record(lambda key: record.get(key, missing())):
        skips.add("filtered_out", where)
        return "skipped", None
    value = record.get(text_field)
    if not isinstance(value, str):
        skips.add("missing_field", where)
        return "missing_field", None
    if not doc_filter.admit(value, where, skips):
        return "skipped", None
    return "ok", value


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


# --- ArrayRecord ------------------------------------------------------------------------------


def _array_record_module(path: str) -> Any:
    try:
        from array_record.python import array_record_module  # optional extra
    except ImportError:
        raise ConfigError(
            f'Reading {path!r} needs array_record; install it with pip install "jaxlm[arrayrecord]".'
        ) from None
    return array_record_module


def _array_record_reader(path: str) -> Any:
    array_record_module = _array_record_module(path)
    local = paths.local_copy(path, None)  # the reader opens local files only
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(local))
    except (RuntimeError, ValueError, OSError) as e:  # e.g. a file too short for a footer
        raise _unreadable(path, "ArrayRecord", e) from None
    if not reader.ok():
        try:
            reader.close()  # raises the reason the reader failed
        except (RuntimeError, ValueError, OSError) as e:
            raise _unreadable(path, "ArrayRecord", e) from None
        raise ConfigError(f"Cannot read {path!r} as ArrayRecord; fix or remove the file.")
    return reader


def array_record_documents(
    path: str, text_field: str, doc_filter: DocFilter, skips: Skips
) -> Iterator[str]:
    """The documents of an ArrayRecord file: its records as JSON objects or as UTF-8 text."""
    reader = _array_record_reader(path)
    counts = {"records": 0, "bad_json": 0, "missing_field": 0, "invalid_utf8": 0}
    as_json: bool | None = None  # decided by the first non-empty record
    try:
        total = reader.num_records()
        for start in range(0, total, RECORDS_PER_READ):
            try:
                records = reader.read(start, min(total, start + RECORDS_PER_READ))
            except (RuntimeError, ValueError, OSError) as e:
                raise _unreadable(path, "ArrayRecord", e) from None
            for j, raw in enumerate(records):
                where = f"{path}:record {start + j}"
                counts["records"] += 1
                if as_json is None and raw.strip():
                    as_json = _is_json_object(raw)
                    if not as_json and doc_filter.where:
                        raise ConfigError(
                            f"--where filters records by field, but the records of {path!r} "
                            "are plain text; drop --where or store JSON objects."
                        )
                if as_json:
                    outcome, text = json_record(raw, where, text_field, doc_filter, skips)
                    counts[outcome] = counts.get(outcome, 0) + 1
                    if text is not None:
                        yield text
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    counts["invalid_utf8"] += 1
                    skips.add("invalid_utf8", where)
                    continue
                if doc_filter.admit(text, where, skips):
                    yield text
    finally:
        reader.close()
    n = counts["records"]
    if n == 0:
        skips.add("empty", path)
    elif counts["invalid_utf8"] == n:
        raise ConfigError(
            f"No record of {path!r} is UTF-8 text or a JSON object (serialized protos such as "
            "tf.train.Example are not read); store each document as text or JSON."
        )
    elif as_json and counts["missing_field"] == n:
        raise ConfigError(
            f"None of the {n} records of {path!r} has a string field {text_field!r}; set "
            "--text-field to the key that holds the text."
        )
