"""Grain input pipeline: token documents -> shuffle -> pack into rows -> batch -> shard.

Every batch is a dict of host numpy arrays, all [batch, seq_len]:
  inputs, targets  int32   next-token pairs; a target never comes from another document
  segment_ids      int32   1, 2, ... for the document pieces of a row; 0 on padding
  positions        int32   0-based position inside the document piece
  weights          float32 1.0 on real target tokens, 0.0 on padding
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from jaxlm.config import ConfigError
from jaxlm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def tokenize_documents(docs: list[str], tok: Tokenizer) -> list[np.ndarray]:
    """Encode documents as int32 arrays of [bos] + ids + [eos]."""
    encoded = tok.encode_batch(docs, bos=True, eos=True)
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def _to_pair(doc: np.ndarray) -> dict[str, np.ndarray]:
    # Shift inside the document, before packing: a target can then never be the first token
    # of whichever document the packer happens to place next in the row.
    return {"inputs": doc[:-1], "targets": doc[1:]}


def _pack(pairs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Pack (inputs, targets) pairs into rows of exactly seq_len tokens."""
    # ConcatThenSplit rather than FirstFit: FirstFit refuses a document longer than the row
    # (we would have to pre-cut it) and pads every bin it closes, while concat-then-split
    # cuts long documents at the row edge and leaves no padding except in the very last row
    # of a finite stream. Its state is also small (parent index plus a slice), so restoring
    # replays at most a row, not a window of packing bins. Both features have equal lengths,
    # so they are cut at the same points and their segment ids / positions coincide.
    packed = ConcatThenSplitIterDataset(
        pairs, length_struct={"inputs": seq_len, "targets": seq_len}
    )
    return _JsonSafePackState(packed)


def _finish_rows(packed: Mapping[str, np.ndarray]) -> Batch:
    """Rename packer outputs to the batch keys and derive the loss weights."""
    segment_ids = packed["inputs_segment_ids"]
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": (segment_ids > 0).astype(np.float32),
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


def make_train_iterator(
    token_docs: list[np.ndarray],
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """Endless, seeded, checkpointable iterator of this shard's rows of each global batch."""
    _check_docs(token_docs)
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1.")
    if batch_size % shard_count != 0:
        raise ConfigError(
            f"Global batch_size={batch_size} does not divide into {shard_count} data shards; "
            "set the batch size to a multiple of the number of data-parallel processes."
        )
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index={shard_index} must lie in [0, {shard_count}).")
    rows_per_shard = batch_size // shard_count
    lo = shard_index * rows_per_shard
    hi = lo + rows_per_shard

    pairs = (
        grain.MapDataset.source(token_docs)
        # shuffle before repeat: each epoch is a fresh permutation (the seed is folded with the
        # epoch), yet every document appears exactly once per epoch.
        .shuffle(seed=seed)
        .repeat()
        .map(_to_pair)
        # The documents already sit in memory; reader threads would only fight over the GIL.
        .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    )
    # Every process builds the same global stream and keeps its own contiguous block of rows,
    # so the shards are disjoint and together equal the global batch.
    batches = _pack(pairs, seq_len).batch(batch_size, drop_remainder=True)
    return iter(batches.map(lambda b: _finish_rows({k: v[lo:hi] for k, v in b.items()})))


def make_eval_batches(token_docs: list[np.ndarray], seq_len: int, batch_size: int) -> list[Batch]:
    """Pack documents in order into finite batches that cover every target token exactly once."""
    _check_docs(token_docs)
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1.")
    pairs = (
        grain.MapDataset.source(token_docs)
        .map(_to_pair)
        .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    )
    rows = [_finish_rows(r) for r in _pack(pairs, seq_len)]
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
