"""Streaming documents for corpora too large to prepare first: raw files tokenized on the fly.

`RawDocuments` is a Grain IterDataset over the documents of Parquet, JSONL, Arrow, ArrayRecord
or text files (whatever `sources.iter_documents` reads, with the same filters), tokenized as
`data prepare` would ([bos] ids [eos], int32). The order is fixed: the sorted files, file
order inside each, epoch after epoch; with a seed, the file order is permuted afresh each
epoch by a keyed generator, so epoch e's order is a function of (seed, e) alone.

The iterator state is JSON, {"epoch", "file", "row"}: `row` documents of the epoch's `file`-th
file were already taken. `set_state` reopens that file and skips `row` documents without
tokenizing them, so a restore reads at most one file's prefix: keep raw shards moderate
(~100 MB) and restores stay cheap. Nothing here grows with the number of documents.

Limits against prepared data (docs/data.md): no random access, so no document-level shuffle
(only files are permuted) and no per-row streams; a process reads every `shard_count`-th file
from `shard_index`, so the data order depends on the process count, and a run that resumes
must keep it.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data.filters import NO_FILTER, DocFilter
from jaxlm.data.sources import SkipCounts, check_filter, expand_inputs, iter_documents
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import ConfigError

TOKENIZE_CHUNK = 64  # documents encoded per call: amortises the tokenizer's per-call cost


class RawDocuments(grain.IterDataset):
    """Token documents of raw files in a fixed, checkpointable order (see the module doc)."""

    def __init__(
        self,
        inputs: Sequence[str],
        tokenizer_path: str,
        *,
        text_field: str = "text",
        split: str = "file",
        doc_filter: DocFilter = NO_FILTER,
        seed: int | None = None,
        repeat: bool = True,
        shard_index: int = 0,
        shard_count: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= shard_index < shard_count:
            raise ConfigError(
                f"shard_index={shard_index} must lie in 0..{shard_count - 1} (shard_count)."
            )
        files = expand_inputs(inputs)[shard_index::shard_count]
        check_filter(files, doc_filter)
        if not files:
            raise ConfigError(
                f"The inputs {list(inputs)} give shard {shard_index} of {shard_count} no file; "
                "use at least as many files as processes."
            )
        self.files = files
        self.tokenizer_path = os.fspath(tokenizer_path)
        self.text_field, self.split, self.doc_filter = text_field, split, doc_filter
        self.seed, self.repeat = seed, repeat

    def file_order(self, epoch: int) -> list[str]:
        """The files of `epoch` in reading order."""
        if self.seed is None:
            return list(self.files)
        rng = np.random.default_rng([self.seed, epoch])
        return [self.files[i] for i in rng.permutation(len(self.files))]

    def __iter__(self) -> RawDocumentsIterator:
        return RawDocumentsIterator(self)

    def __str__(self) -> str:
        return f"RawDocuments({len(self.files)} files, seed={self.seed})"


class RawDocumentsIterator(grain.DatasetIterator):
    """Iterator of RawDocuments; its state is {"epoch", "file", "row"}."""

    def __init__(self, ds: RawDocuments) -> None:
        super().__init__()
        self._ds = ds
        self._tok = load_tokenizer(ds.tokenizer_path)
        self._epoch, self._file, self._row = 0, 0, 0
        self._order = ds.file_order(0)
        self._texts: Iterator[str] | None = None  # the current file's documents, ahead of _row
        self._ready: collections.deque[np.ndarray] = collections.deque()
        self._epoch_docs = 0  # documents in this epoch so far: an empty epoch would spin
        self.skips = SkipCounts()  # what the filters and bad input left out, for the caller

    def _open(self) -> None:
        path = self._order[self._file]
        self._texts = iter_documents(
            path, self._ds.split, self._ds.text_field, self.skips, self._ds.doc_filter
        )
        skipped = sum(1 for _ in itertools.islice(self._texts, self._row))
        if skipped < self._row:
            raise ConfigError(
                f"The saved data position is document {self._row} of {path!r}, which now holds "
                f"{skipped}; the inputs changed since the checkpoint, so restore the files or "
                "start a new run."
            )

    def _next_file(self) -> None:
        self._texts, self._row = None, 0
        self._file += 1
        if self._file < len(self._order):
            return
        if not self._ds.repeat:
            raise StopIteration
        if self._epoch_docs == 0:
            raise ConfigError(
                f"The {len(self._order)} input file(s) hold no usable documents; check the "
                "files, the text field and the filters."
            )
        self._epoch, self._file, self._epoch_docs = self._epoch + 1, 0, 0
        self._order = self._ds.file_order(self._epoch)

    def __next__(self) -> np.ndarray:
        while not self._ready:
            if self._texts is None:
                self._open()
            texts = list(itertools.islice(self._texts, TOKENIZE_CHUNK))
            if not texts:
                self._next_file()
                continue
            ids = self._tok.encode_batch(texts, bos=True, eos=True)
            self._ready.extend(np.asarray(x, np.int32) for x in ids)
        self._row += 1
        self._epoch_docs += 1
        return self._ready.popleft()

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "file": self._file, "row": self._row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._file, self._row = state["epoch"], state["file"], state["row"]
        self._order = self._ds.file_order(self._epoch)
        if not 0 <= self._file < len(self._order):
            raise ConfigError(
                f"The saved data position names file {self._file} of an epoch of "
                f"{len(self._order)} files; resume with the inputs and process count it was "
                "saved with."
            )
        # Documents were taken this epoch unless it is the epoch's start (the guard against
        # an empty epoch then fires one epoch later at worst, never wrongly).
        self._texts, self._epoch_docs = None, int(self._file > 0 or self._row > 0)
        self._ready.clear()
