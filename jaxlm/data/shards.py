"""Prepared token shards on disk: the format, an atomic writer, and a random-access reader.

A prepared directory (written by `jaxlm data prepare`) holds
  manifest.json               format version, tokenizer (sha256, vocab size), settings,
                              sources, and one entry per finished shard
  shard-NNNNN.tokens.npy      every document's token ids, end to end (uint16, or int32
                              when the vocabulary exceeds 65,535)
  shard-NNNNN.offsets.npy     int64, documents+1 entries: document i is tokens[o[i]:o[i+1]]

Each document is stored as [bos] + ids + [eos], exactly what the training pipeline packs.
Both files of a shard are written to a temporary name and renamed, and the manifest is
rewritten (also by rename) after every shard, so a crash never leaves a half-written shard
that a reader would trust.

Reader API (used by the training pipeline and by evaluation):
  ds = open_prepared(directory)    # ConfigError if it is missing, unfinished or malformed
  ds.manifest                      # the manifest as a dict
  ds.num_documents, len(ds)        # documents across all shards
  ds.num_tokens                    # tokens across all shards (bos/eos included)
  ds.document(i), ds[i]            # np.ndarray int32 of document i, read from memory maps
`ds` is a Grain random-access data source (`__len__`, `__getitem__`), so
`grain.MapDataset.source(ds)` works, and it pickles (for Grain worker processes) by path.

The directory may be a gs:// or s3:// URL. There each file is put whole (an object store has
no rename, and a put is atomic), and a reader copies each shard once into a local cache
directory (`cache_dir`, default `paths.default_cache_dir()`) and memory-maps the copy, so
memory stays bounded whatever the data's size.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm import paths
from jaxlm.errors import ConfigError

FORMAT = "jaxlm-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned-safe dtype for ids below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def as_dir(directory: str | os.PathLike) -> Path | paths.Path:
    """A local directory as a pathlib.Path, a gs:// or s3:// one as an epath.Path."""
    if paths.is_remote(directory):
        return paths.as_path(directory, "The prepared directory")
    return Path(directory)


def make_dir(directory: str | os.PathLike) -> None:
    """Create a local directory (with parents); an object store needs none."""
    if not paths.is_remote(directory):
        Path(directory).mkdir(parents=True, exist_ok=True)


def shard_paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """(tokens, offsets) file paths of shard `name`."""
    d = as_dir(directory)
    return d / f"{name}.tokens.npy", d / f"{name}.offsets.npy"


def _atomic_write(path: Path, write) -> None:
    if paths.is_remote(path):  # one put of the whole file
        buf = io.BytesIO()
        write(buf)
        paths.write_bytes_atomic(path, buf.getvalue())
        return
    # Not mkstemp, which makes the file 0600: the shard keeps the user's umask (0644).
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_shard(directory: str | Path, name: str, tokens: np.ndarray, offsets: np.ndarray) -> None:
    """Write one shard's two arrays atomically (offsets first, tokens last)."""
    tokens_path, offsets_path = shard_paths(directory, name)
    _atomic_write(offsets_path, lambda f: np.save(f, offsets.astype(np.int64)))
    _atomic_write(tokens_path, lambda f: np.save(f, tokens))


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Replace manifest.json atomically; keys are sorted so equal content gives equal bytes."""
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _atomic_write(as_dir(directory) / MANIFEST, lambda f: f.write(text.encode("utf-8")))


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a prepared directory, or None when there is none."""
    path = as_dir(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path} is not a readable manifest ({e}); re-run jaxlm data prepare into a new "
            "directory."
        ) from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path} is format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, but this jaxlm reads {FORMAT!r} version "
            f"{FORMAT_VERSION}; prepare the data again with this version."
        )
    return manifest


def is_prepared(path: str | Path) -> bool:
    """True when `path` is a directory holding a manifest.json."""
    return (as_dir(path) / MANIFEST).is_file()


class PreparedShards:
    """Random access to the documents of a prepared directory (a Grain data source)."""

    def __init__(
        self,
        directory: str | Path,
        allow_incomplete: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if paths.is_remote(directory):
            paths.check_reachable(directory, "The prepared directory")
            self.directory = as_dir(directory)
        else:
            self.directory = Path(directory).absolute()
        self._allow_incomplete = allow_incomplete
        self._cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise ConfigError(
                f"{str(directory)!r} holds no {MANIFEST}; run `jaxlm data prepare --output "
                f"{directory}` first."
            )
        if not manifest.get("complete") and not allow_incomplete:
            raise ConfigError(
                f"Preparing {str(directory)!r} did not finish ({len(manifest['shards'])} "
                "shard(s) written); run the same `jaxlm data prepare` command again to finish it."
            )
        self.manifest = manifest
        counts = [int(s["documents"]) for s in manifest["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._tokens: list[np.ndarray | None] = [None] * len(counts)
        self._offsets: list[np.ndarray | None] = [None] * len(counts)

    @property
    def num_documents(self) -> int:
        """Documents across all shards."""
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        """Tokens across all shards, bos and eos included."""
        return sum(int(s["tokens"]) for s in self.manifest["shards"])

    @property
    def max_token_id(self) -> int:
        """The largest token id stored in any shard (-1 when empty)."""
        return max((int(s["max_token_id"]) for s in self.manifest["shards"]), default=-1)

    def _open(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._tokens[k] is None:
            entry = self.manifest["shards"][k]
            tokens_path, offsets_path = shard_paths(self.directory, entry["name"])
            try:  # a remote shard is mapped from its copy in the local cache
                offsets_path = paths.local_copy(offsets_path, self._cache_dir)
                tokens_path = paths.local_copy(tokens_path, self._cache_dir)
            except OSError as e:
                raise ConfigError(
                    f"Shard {entry['name']} of {str(self.directory)!r} can't be copied into the "
                    f"local cache ({e}); check access to the bucket and set data.cache_dir to a "
                    "writable local directory."
                ) from e
            try:
                offsets = np.load(offsets_path, mmap_mode="r")
                tokens = np.load(tokens_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"Shard {entry['name']} of {str(self.directory)!r} is unreadable ({e}); "
                    "prepare the data again into a new directory."
                ) from e
            if len(offsets) != entry["documents"] + 1 or len(tokens) != entry["tokens"]:
                raise ConfigError(
                    f"Shard {entry['name']} of {str(self.directory)!r} does not match its "
                    "manifest entry; prepare the data again into a new directory."
                )
            self._tokens[k], self._offsets[k] = tokens, offsets
        return self._tokens[k], self._offsets[k]

    def document(self, i: int) -> np.ndarray:
        """Token ids (int32) of document `i`, bos and eos included."""
        i = int(i)
        if i < 0:
            i += self.num_documents
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} is out of range [0, {self.num_documents})")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        tokens, offsets = self._open(k)
        j = i - int(self._starts[k])
        return np.asarray(tokens[offsets[j] : offsets[j + 1]], dtype=np.int32)

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, i: int) -> np.ndarray:
        return self.document(i)

    # Memory maps don't pickle; a Grain worker process reopens the files by path instead.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "allow_incomplete": self._allow_incomplete,
            "cache_dir": self._cache_dir,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["allow_incomplete"], state.get("cache_dir"))

    def __repr__(self) -> str:
        return (
            f"PreparedShards({str(self.directory)!r}, documents={self.num_documents}, "
            f"tokens={self.num_tokens})"
        )


def open_prepared(
    directory: str | Path,
    allow_incomplete: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> PreparedShards:
    """Open a prepared directory for random access (see the module docstring); `cache_dir`
    is where shards of a gs:// or s3:// directory are copied (None: the default cache)."""
    return PreparedShards(directory, allow_incomplete=allow_incomplete, cache_dir=cache_dir)
