"""`jaxlm data prepare`: text files -> tokenized shards + manifest, in parallel, resumably.

Inputs are any format sources.py reads (text, JSONL, Parquet, Arrow, ArrayRecord, Hugging
Face dataset directories), optionally filtered by a `DocFilter`; the filter is part of the
recorded settings, so a re-run with other filters is refused like one with another tokenizer.

Documents are read in a fixed order (sorted input paths, file order inside each) and cut into
shards of about `shard_bytes` of UTF-8 text, so the shard a document lands in depends only on
the inputs. Each manifest entry records a SHA-256 of its shard's text; a re-run recomputes
that while reading (cheap next to tokenizing) and skips every shard whose files exist and
whose text is unchanged. Changed inputs under finished shards are an error, never a silent
overwrite.

`output`, the inputs and the tokenizer may each be gs:// or s3:// URLs: shards are then put
whole, and the manifest, put after each shard, names only shards already in the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import logging
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxlm import paths
from jaxlm.data import shards as shard_io
from jaxlm.data.filters import NO_FILTER, DocFilter
from jaxlm.data.sources import (
    SkipCounts,
    check_filter,
    expand_inputs,
    iter_documents,
    source_record,
)
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import ConfigError

CHUNK_BYTES = 1 << 20  # text handed to a worker at a time: big enough to amortise pickling

_worker_tok = None

logger = logging.getLogger(__name__)


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(tokenizer_path)


def _encode(tok, texts: list[str], threads: int) -> tuple[np.ndarray, np.ndarray]:
    try:  # SentencePiece takes a thread count; other tokenizers pick their own
        ids = tok.encode_batch(texts, bos=True, eos=True, num_threads=threads)
    except TypeError:
        ids = tok.encode_batch(texts, bos=True, eos=True)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
    return flat, lengths


def _tokenize_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # One thread per worker process: the processes already fill the cores.
    return _encode(_worker_tok, texts, 1)


class _Shard:
    """A shard being assembled: its texts' hash and byte count, and pending token chunks."""

    def __init__(self, index: int, tokenize: bool) -> None:
        self.index = index
        self.name = f"shard-{index:05d}"
        self.tokenize = tokenize
        self.hasher = hashlib.sha256()
        self.documents = 0
        self.bytes = 0
        self.chunks: list[Any] = []  # futures or (tokens, lengths) results, in order
        self.pending: list[str] = []
        self.pending_bytes = 0


def _settings(
    tok, split: str, text_field: str, shard_bytes: int, doc_filter: DocFilter
) -> dict[str, Any]:
    # Filter settings are None when unset, which is what manifests from before filters read as.
    return {
        "split": split,
        "text_field": text_field,
        "shard_bytes": shard_bytes,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        **doc_filter.settings(),
    }


def _check_existing(existing: dict[str, Any], settings: dict[str, Any], output) -> None:
    old = {k: existing["settings"].get(k) for k in settings}
    for key, value in settings.items():
        if old[key] != value:
            raise ConfigError(
                f"{output} was prepared with {key}={old[key]!r} but this run asks for "
                f"{value!r}; use a new --output directory (nothing was changed)."
            )


def prepare(
    inputs: Sequence[str],
    tokenizer_path: str,
    output: str | Path,
    *,
    split: str = "file",
    text_field: str = "text",
    workers: int = 1,
    shard_bytes: int = 64 << 20,
    doc_filter: DocFilter = NO_FILTER,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize the documents of `inputs` into shards under `output`; returns the manifest.

    Only documents that pass `doc_filter` are kept. `log` receives the skip and summary
    lines (default: this module's logger).
    """
    log = log or logger.info
    if workers < 1 or shard_bytes < 1:
        raise ConfigError(f"workers={workers} and shard_bytes={shard_bytes} must be >= 1.")
    paths.check_reachable(output, "--output")
    files = expand_inputs(inputs)
    check_filter(files, doc_filter)
    tok = load_tokenizer(tokenizer_path)
    output = shard_io.as_dir(output)
    shard_io.make_dir(output)
    settings = _settings(tok, split, text_field, shard_bytes, doc_filter)
    existing = shard_io.read_manifest(output)
    done: dict[int, dict[str, Any]] = {}
    if existing is not None:
        _check_existing(existing, settings, output)
        for i, entry in enumerate(existing["shards"]):
            if all(p.is_file() for p in shard_io.shard_paths(output, entry["name"])):
                done[i] = entry
    dtype = shard_io.token_dtype(tok.vocab_size)
    manifest: dict[str, Any] = {
        "format": shard_io.FORMAT,
        "format_version": shard_io.FORMAT_VERSION,
        "complete": False,
        "tokenizer": {
            "path": (
                tokenizer_path
                if paths.is_remote(tokenizer_path)
                else str(Path(tokenizer_path).absolute())
            ),
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "dtype": dtype.name,
        "settings": settings,
        "sources": [source_record(p) for p in files],
        "shards": [],
    }
    skips = SkipCounts()
    stats = {"written": 0, "reused": 0, "tokenized_tokens": 0}
    pool = None
    if workers > 1:
        # spawn, not fork: a forked child would inherit the parent's SentencePiece threads.
        ctx = multiprocessing.get_context("spawn")
        pool = cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer_path,)
        )
    bar = _bar(progress, sum(s["size"] for s in manifest["sources"]))
    t0 = time.perf_counter()

    def flush_chunk(shard: _Shard) -> None:
        if not shard.pending:
            return
        if pool is None:
            shard.chunks.append(_encode(tok, shard.pending, -1))
        else:
            shard.chunks.append(pool.submit(_tokenize_in_worker, shard.pending))
        shard.pending, shard.pending_bytes = [], 0

    def close(shard: _Shard) -> None:
        flush_chunk(shard)
        text_sha = shard.hasher.hexdigest()
        old = done.get(shard.index)
        if old is not None:
            if old["text_sha256"] != text_sha or old["documents"] != shard.documents:
                raise ConfigError(
                    f"The inputs changed since {shard.name} of {output} was prepared (its text "
                    "differs now); prepare into a new --output directory (nothing was changed)."
                )
            manifest["shards"].append(old)
            stats["reused"] += 1
        else:
            parts = [c.result() if isinstance(c, cf.Future) else c for c in shard.chunks]
            flat = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
            lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            shard_io.write_shard(output, shard.name, flat.astype(dtype), offsets)
            manifest["shards"].append(
                {
                    "name": shard.name,
                    "documents": shard.documents,
                    "tokens": int(flat.size),
                    "bytes": shard.bytes,
                    "max_token_id": int(flat.max()) if flat.size else -1,
                    "text_sha256": text_sha,
                }
            )
            stats["written"] += 1
            stats["tokenized_tokens"] += int(flat.size)
        # The manifest follows every shard, so an interrupted run keeps all finished work.
        shard_io.write_manifest(output, manifest)
        if bar is not None:
            bar.set_postfix(shards=len(manifest["shards"]), refresh=False)

    try:
        shard = _Shard(0, 0 not in done)
        for path, record in zip(files, manifest["sources"], strict=True):
            for text in iter_documents(path, split, text_field, skips, doc_filter):
                data = text.encode("utf-8")
                # Length-prefix each document so the hash sees document boundaries too.
                shard.hasher.update(len(data).to_bytes(8, "little"))
                shard.hasher.update(data)
                shard.documents += 1
                shard.bytes += len(data)
                if shard.tokenize:
                    shard.pending.append(text)
                    shard.pending_bytes += len(data)
                    if shard.pending_bytes >= CHUNK_BYTES:
                        flush_chunk(shard)
                if shard.bytes >= shard_bytes:
                    close(shard)
                    shard = _Shard(shard.index + 1, shard.index + 1 not in done)
            if bar is not None:
                bar.update(record["size"])
        if shard.documents:
            close(shard)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()

    if skips.total():
        log(skips.summary())
    if not manifest["shards"]:
        raise ConfigError(
            f"The inputs {list(inputs)} hold no usable documents ({skips.total()} item(s) "
            "skipped); check the files, --split, --text-field and the filters."
        )
    manifest["skipped"] = dict(skips.counts)
    manifest["documents"] = sum(s["documents"] for s in manifest["shards"])
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    manifest["complete"] = True
    shard_io.write_manifest(output, manifest)
    elapsed = time.perf_counter() - t0
    log(
        f"{output}: {len(manifest['shards'])} shard(s) ({stats['written']} written, "
        f"{stats['reused']} already done), {manifest['documents']} documents, "
        f"{manifest['tokens']} tokens, {elapsed:.1f} s"
    )
    manifest_out = dict(manifest)
    manifest_out["_run"] = {**stats, "seconds": elapsed}
    return manifest_out


def _bar(enabled: bool, total: int):
    if not enabled:
        return None

    return tqdm(
        total=total, desc="prepare", unit="B", unit_scale=True, dynamic_ncols=True, file=sys.stderr
    )
