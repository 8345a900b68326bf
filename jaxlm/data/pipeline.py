"""Grain input pipeline: token documents -> shuffle -> mix -> pack into rows -> batch -> shard.

The global batch of B rows is cut into `streams` blocks of B/streams rows. Block k always comes
from stream k: every streams-th document of each source, in a keyed permutation per epoch
(data/order.py, data/permute.py: nothing stored per document), documents held out for
validation skipped, sources drawn at random by weight, then packed. A process that owns rows
[lo, hi) builds only the streams those rows fall in, so it reads only their documents, and
the global batch is the same for 1, 2 or 4 processes; `workers` moves that reading and
packing into worker processes without changing a batch (data/rows.py).

Epochs: each stream and source repeats on its own; every document of a stream appears once per
epoch of that stream. An endless stream never pads, so nothing is dropped (the finite eval
batches pad only their last row).

Every batch is a dict of host numpy arrays, all [batch, seq_len]:
  inputs, targets  int32   next-token pairs; a target never comes from another document
  segment_ids      int32   1, 2, ... for the document pieces of a row; 0 on padding
  positions        int32   0-based position inside the document piece
  weights          float32 1.0 on real target tokens, 0.0 on padding; chat documents
                           (data/chat.py) carry their own mask: 1.0 on assistant targets only
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from jaxlm.data.chat import is_chat_docs
from jaxlm.data.order import StreamOrder, WeightedMix
from jaxlm.data.rows import RowBlocks, WorkerRows
from jaxlm.data.streamed import ProcessBound
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.errors import ConfigError

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def tokenize_documents(docs: list[str], tok: Tokenizer) -> list[np.ndarray]:
    """Encode documents as int32 arrays of [bos] + ids + [eos]."""
    encoded = tok.encode_batch(docs, bos=True, eos=True)
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def _to_pair(doc: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Shift inside the document, before packing: a target can then never be the first token
    # of whichever document the packer happens to place next in the row.
    if isinstance(doc, Mapping):  # a chat document: its mask weighs each target token
        return {"inputs": doc["ids"][:-1], "targets": doc["ids"][1:], "weights": doc["mask"][1:]}
    return {"inputs": doc[:-1], "targets": doc[1:]}


def _pack(pairs: grain.IterDataset, seq_len: int, masked: bool = False) -> grain.IterDataset:
    """Pack (inputs, targets) pairs into rows of exactly seq_len tokens."""
    # ConcatThenSplit rather than FirstFit: FirstFit refuses a document longer than the row
    # (we would have to pre-cut it) and pads every bin it closes, while concat-then-split
    # cuts long documents at the row edge and leaves no padding except in the very last row
    # of a finite stream. Its state is also small (parent index plus a slice), so restoring
    # replays at most a row, not a window of packing bins. Both features have equal lengths,
    # so they are cut at the same points and their segment ids / positions coincide.
    keys = ("inputs", "targets", "weights") if masked else ("inputs", "targets")
    packed = ConcatThenSplitIterDataset(pairs, length_struct=dict.fromkeys(keys, seq_len))
    return _JsonSafePackState(packed)


def _finish_rows(packed: Mapping[str, np.ndarray]) -> Batch:
    """Rename packer outputs to the batch keys and derive the loss weights."""
    segment_ids = packed["inputs_segment_ids"]
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": np.asarray(packed.get("weights", segment_ids > 0), np.float32),
    }


def _check_docs(token_docs: list[np.ndarray]) -> None:
    if not token_docs:
        raise ConfigError("No token documents were given; check that the corpus is not empty.")
    shortest = min(len(d) for d in token_docs)
    if shortest < 2:
        raise ConfigError(
            f"A token document has {shortest} token(s) but needs at least 2 to form an "
            "(input, target) pair; wrap documents in bos/eos with tokenize_documents."
        )


@dataclasses.dataclass(frozen=True)
class WeightedSource:
    """Token documents (a random-access sequence, or the training side of a views.HashSplit)
    and their share of the training tokens."""

    docs: Sequence[np.ndarray]
    weight: float = 1.0
    name: str = ""
    # Mean tokens per document; mixing happens per document, so token shares need it.
    mean_tokens: float | None = None


def _as_sources(sources: Sequence[Any]) -> list[WeightedSource]:
    # Only a list is inspected: peeking into a lazy source would read one of its documents.
    if isinstance(sources, list) and sources and isinstance(sources[0], WeightedSource):
        return list(sources)
    return [WeightedSource(sources)]


def _stream_seed(seed: int, stream: int, source: int) -> int:
    return int(np.random.SeedSequence([seed, stream, source]).generate_state(1)[0])


def _stream_rows(
    sources: list[WeightedSource], k: int, streams: int, seed: int, seq_len: int
) -> grain.IterDataset:
    """Stream k: its 1/streams of every source's documents, shuffled per epoch, mixed, packed."""
    parts = []
    for s, src in enumerate(sources):
        # Strided, so a stream's documents come from everywhere in the source and a host
        # reads only the documents of the streams it builds; each epoch a keyed permutation
        # (data/order.py) that skips documents held out for validation.
        part = StreamOrder(src.docs, k, streams, _stream_seed(seed, k, s))
        if part.n == 0:
            raise ConfigError(
                f"Source {src.name or s!r} has {len(part.source)} document(s), fewer than "
                f"data.streams={streams}; lower data.streams or add documents."
            )
        if not part.has_documents():  # a split view holds out every document of the stream
            raise ConfigError(
                f"Stream {k} of source {src.name or s!r} holds only documents held out for "
                f"validation; lower data.streams={streams} or data.validation_fraction."
            )
        parts.append(part)
    if len(parts) == 1:
        pairs = parts[0].map(_to_pair)
    else:
        # Weights are shares of the trained (target) tokens, of which a document of L tokens
        # gives L - 1; documents are drawn, so divide by that mean.
        doc_weights = [src.weight / max((src.mean_tokens or 2.0) - 1.0, 1.0) for src in sources]
        mix_seed = _stream_seed(seed, k, len(sources))
        pairs = WeightedMix(parts, doc_weights, mix_seed).map(_to_pair)
    return _pack(pairs, seq_len, masked=any(is_chat_docs(src.docs) for src in sources))


def make_train_iterator(
    sources: Sequence[np.ndarray] | Sequence[WeightedSource] | grain.IterDataset,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    streams: int = 1,
    prefetch: int = 0,
    workers: int = 0,
) -> grain.DatasetIterator:
    """Endless, seeded, checkpointable iterator of this shard's rows of each global batch.

    `sources` is a list of token documents, or of WeightedSource for a mixture. The global
    batch is `streams` blocks of batch_size/streams rows; block k comes from stream k, an
    independent shuffled and packed stream over every streams-th document. A process builds
    only the streams its rows [lo, hi) touch, so any shard_count yields the same global batch.
    With `workers` > 0 the streams are read and packed in that many worker processes, with
    the same batches and the same form of state (data/rows.py). An IterDataset of documents
    (data.streaming) is packed in its order instead, into this process's rows alone.
    """
    srcs = _as_sources(sources)
    for src in srcs:
        if isinstance(src.docs, list):
            _check_docs(src.docs)
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1.")
    if batch_size % shard_count != 0:
        raise ConfigError(
            f"Global batch_size={batch_size} does not divide into {shard_count} data shards; "
            "set the batch size to a multiple of the number of data-parallel processes."
        )
    if streams < 1 or batch_size % streams != 0:
        raise ConfigError(
            f"data.streams={streams} does not divide batch_size={batch_size}; choose a divisor."
        )
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index={shard_index} must lie in [0, {shard_count}).")
    if any(not src.weight > 0 for src in srcs):
        raise ConfigError("Every data source weight must be positive; fix data.sources.")
    if workers < 0:
        raise ConfigError(f"data.workers={workers} must be >= 0 (0: read in this process).")
    rows_per_shard = batch_size // shard_count
    if isinstance(sources, grain.IterDataset):  # data.streaming: this process's documents
        ds = _streamed_rows(sources, seq_len, rows_per_shard, shard_index, shard_count)
        return iter(_prefetched(ds, prefetch))
    lo = shard_index * rows_per_shard
    hi = lo + rows_per_shard
    per_stream = batch_size // streams
    first, last = lo // per_stream, (hi - 1) // per_stream
    build = functools.partial(_stream_rows, srcs, streams=streams, seed=seed, seq_len=seq_len)
    indices = list(range(first, last + 1))
    if workers > 0:
        for k in indices:  # here, so a stream that can't be built raises before workers start
            build(k)
        rows: grain.IterDataset = WorkerRows(build, indices, per_stream, workers)
    else:
        rows = RowBlocks(build, indices, per_stream)
    # Rows [lo, hi) of the global batch, counted from the first stream this process builds.
    a, b = lo - first * per_stream, hi - first * per_stream
    ds = rows.map(lambda batch: _finish_rows({k: v[a:b] for k, v in batch.items()}))
    return iter(_prefetched(ds, prefetch))


def _prefetched(ds: grain.IterDataset, prefetch: int) -> grain.IterDataset:
    if prefetch > 0:
        # Packing runs in Python; a background thread keeps it off the step's critical path.
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def _streamed_rows(
    docs: grain.IterDataset, seq_len: int, rows: int, shard_index: int, shard_count: int
) -> grain.IterDataset:
    """This process's `rows` rows of each batch, packed from the documents it streams alone
    (its own files): unlike prepared data, the global batch depends on the process count."""
    packed = _pack(docs.map(_to_pair), seq_len).batch(rows, drop_remainder=True)
    return ProcessBound(packed, shard_index, shard_count).map(_finish_rows)


def make_eval_batches(
    token_docs: Sequence[np.ndarray], seq_len: int, batch_size: int, max_batches: int | None = None
) -> list[Batch]:
    """Pack documents in order into finite batches that cover every target token exactly once.

    With `max_batches`, packing stops after that many batches (the rest is never read).
    """
    if isinstance(token_docs, list):
        _check_docs(token_docs)
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1.")
    pairs = _InOrder(token_docs).map(_to_pair)
    rows = [
        _finish_rows(r)
        for r in itertools.islice(
            _pack(pairs, seq_len, is_chat_docs(token_docs)),
            None if max_batches is None else max_batches * batch_size,
        )
    ]
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: np.stack([r[k] for r in chunk]) for k in BATCH_KEYS}
        missing = batch_size - len(chunk)
        if missing:
            # Whole rows of padding (weight 0) keep every eval batch the same shape, so one
            # compiled eval step serves them all.
            batch = {
                k: np.concatenate([v, np.zeros((missing, seq_len), v.dtype)])
                for k, v in batch.items()
            }
        batches.append(batch)
    return batches


class _InOrder(grain.IterDataset):
    """The documents of an iterable, once, in order; for eval batches, which are never saved."""

    # Iterating, not indexing: a split view (data/views.py) then never counts its documents.

    def __init__(self, docs: Iterable[Any]) -> None:
        super().__init__()
        self._docs = docs

    def __iter__(self) -> grain.DatasetIterator:
        return _InOrderIterator(iter(self._docs))


class _InOrderIterator(grain.DatasetIterator):
    """Iterator side of _InOrder."""

    def __init__(self, docs: Iterator[Any]) -> None:
        super().__init__()
        self._docs, self._taken = docs, 0

    def __next__(self) -> Any:
        doc = next(self._docs)
        self._taken += 1
        return doc

    def get_state(self) -> dict[str, Any]:
        return {"taken": self._taken}  # the packer records it; nothing restores it

    def set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("eval batches are packed once and not checkpointed")


def _tuples(slices: Mapping[str, Iterable[int]]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in slices.items()}


class _JsonSafePackState(grain.IterDataset):
    """Pass-through that makes ConcatThenSplit's iterator state survive a JSON round trip."""

    # ConcatThenSplit marks "no partial document pending" with the tuple (-1, -1) and compares
    # with `!=`. JSON (what grain.checkpoint writes) turns it into the list [-1, -1], which then
    # never equals the tuple, and a restored iterator silently drops one document. Converting
    # the slices back to tuples before restoring makes the saved state exact again.

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafePackStateIterator(self._parent.__iter__())


class _JsonSafePackStateIterator(grain.DatasetIterator):
    """Iterator side of _JsonSafePackState."""

    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["remainder_slices"] = _tuples(state["remainder_slices"])
        self._parent.set_state(state)
