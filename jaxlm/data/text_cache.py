"""Token ids of an in-memory text corpus, cached in the workdir as prepared shards.

One process tokenizes; the others, and every later start of the run, read the result.
<workdir>/tokens/<key>/{train,val}/ are prepared directories (see shards.py), one shard each.
The key is a SHA-256 of the tokenizer's SHA-256 and of every document's text, so a changed
corpus, split or tokenizer gets a new directory and is never read from a stale one.
The workdir may be a gs:// or s3:// URL (an epath.Path): the shards are then put whole, and
read back through a local copy in `cache_dir` (see shards.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxlm import paths
from jaxlm.data import shards
from jaxlm.data.pipeline import tokenize_documents
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_DIR = "tokens"
Splits = Mapping[str, Sequence[str]]  # split name -> its documents' text
Dir = Path | paths.Path  # a local directory, or a gs:// / s3:// one


def cache_directory(workdir: Dir, splits: Splits, tok: Tokenizer) -> Dir:
    """Where the token ids of `splits` under `tok` live in `workdir`."""
    h = hashlib.sha256(tok.sha256.encode())
    for name, docs in splits.items():
        h.update(f"\0{name}\0{len(docs)}\0".encode())
        for doc in docs:
            data = doc.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)
    return workdir / CACHE_DIR / h.hexdigest()[:32]


def read_cached(
    directory: Dir, splits: Splits, cache_dir: str | os.PathLike | None = None
) -> dict[str, list[np.ndarray]] | None:
    """Each split's token documents from the cache, or None when it is absent or incomplete;
    `cache_dir` is where a remote workdir's shards are copied to be read."""
    out = {}
    for name, docs in splits.items():
        if not shards.is_prepared(directory / name):
            return None
        try:
            ds = shards.open_prepared(directory / name, cache_dir=cache_dir)
        except ConfigError:  # unfinished or damaged: tokenize again
            return None
        if len(ds) != len(docs):
            return None
        out[name] = [ds[i] for i in range(len(ds))]
    return out


def tokenize_and_write(
    directory: Dir, splits: Splits, tok: Tokenizer
) -> dict[str, list[np.ndarray]]:
    """Tokenize every split and write it to the cache; a failed write only costs the cache."""
    out = {name: tokenize_documents(list(docs), tok) for name, docs in splits.items()}
    try:
        for name, token_docs in out.items():
            _write(directory / name, token_docs, tok)
    except OSError as e:
        logger.warning("Could not cache the token ids in %s (%s); continuing.", directory, e)
    return out


def _write(directory: Dir, docs: list[np.ndarray], tok: Tokenizer) -> None:
    shards.make_dir(directory)
    lengths = np.fromiter(map(len, docs), np.int64, count=len(docs))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    tokens = tokens.astype(shards.token_dtype(tok.vocab_size))
    shards.write_shard(directory, "shard-00000", tokens, offsets)
    # The manifest goes last: a directory without one is never read.
    shards.write_manifest(
        directory,
        {
            "format": shards.FORMAT,
            "format_version": shards.FORMAT_VERSION,
            "tokenizer": {"path": tok.path, "sha256": tok.sha256, "vocab_size": tok.vocab_size},
            "shards": [
                {
                    "name": "shard-00000",
                    "documents": len(docs),
                    "tokens": int(offsets[-1]),
                    "max_token_id": int(tokens.max()) if tokens.size else -1,
                }
            ],
            "documents": len(docs),
            "tokens": int(offsets[-1]),
            "complete": True,
        },
    )
