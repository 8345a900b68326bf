"""Which document comes next: a stream's documents in a fresh keyed permutation each epoch,
and a seeded draw among sources by weight. State is a few counters, whatever the corpus size.

Stream k of `streams` owns documents k, k + streams, ... of a source: its positions
0 .. n - 1 map to those documents. Epoch e visits position p at Permutation(n, seed, e)(p),
computed a block at a time; a document a split view holds out (validation) is skipped, so
every training document of the stream comes exactly once per epoch and the stream's state is
one integer: positions consumed so far, held-out ones included.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data.permute import Permutation
from jaxlm.data.views import HashSplit, splitmix64
from jaxlm.errors import ConfigError

BLOCK = 1024  # positions permuted per numpy call; the only per-stream buffer (16 kB)


def stream_size(n_docs: int, k: int, streams: int) -> int:
    """Documents k, k + streams, ... of n_docs: how many there are."""
    return max(0, -(-(n_docs - k) // streams))


class StreamOrder(grain.IterDataset):
    """Endless documents of stream k of a source, each epoch in a fresh seeded permutation."""

    def __init__(self, docs: Sequence[np.ndarray], k: int, streams: int, seed: int) -> None:
        super().__init__()
        split = docs if isinstance(docs, HashSplit) else None
        self.source = split.source if split is not None else docs
        self.split, self.k, self.streams, self.seed = split, k, streams, seed
        self.n = stream_size(len(self.source), k, streams)

    def has_documents(self) -> bool:
        """Whether a document of the stream is not held out; stops at the first block with one."""
        if self.split is None:
            return self.n > 0
        for start in range(0, self.n, BLOCK):
            doc_B = self.k + self.streams * np.arange(start, min(start + BLOCK, self.n))
            if self.split.keeps_array(doc_B).any():
                return True
        return False

    def __iter__(self) -> grain.DatasetIterator:
        return _StreamOrderIterator(self)

    def __str__(self) -> str:
        return f"StreamOrder(k={self.k}, streams={self.streams}, n={self.n})"


class _StreamOrderIterator(grain.DatasetIterator):
    """Iterator side of StreamOrder; state: {"position": positions consumed}."""

    def __init__(self, ds: StreamOrder) -> None:
        super().__init__()
        self._ds, self._position = ds, 0
        self._perm: Permutation | None = None
        self._block = (-1, -1, np.zeros(0, np.int64), np.zeros(0, bool))  # epoch, block, ...

    def _load(self, epoch: int, b: int) -> None:
        ds = self._ds
        if self._perm is None or self._block[0] != epoch:
            self._perm = Permutation(ds.n, ds.seed, epoch)
        pos_B = self._perm.block(b * BLOCK, min((b + 1) * BLOCK, ds.n))
        doc_B = ds.k + ds.streams * pos_B
        keep_B = ds.split.keeps_array(doc_B) if ds.split is not None else np.ones(len(doc_B), bool)
        self._block = (epoch, b, doc_B, keep_B)

    def __next__(self) -> Any:
        ds = self._ds
        for _ in range(ds.n):  # at most one epoch of held-out documents in a row
            epoch, pos = divmod(self._position, ds.n)
            b = pos // BLOCK
            if self._block[:2] != (epoch, b):
                self._load(epoch, b)
            self._position += 1
            if self._block[3][pos - b * BLOCK]:
                return ds.source[int(self._block[2][pos - b * BLOCK])]
        raise ConfigError(
            f"Stream {ds.k} of {ds.streams} holds no training document (all {ds.n} are held "
            "out for validation); lower data.streams or data.validation_fraction."
        )

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        # "next_index": earlier versions' one-stream state; it counted documents taken, which
        # is where the stream continues (in the new order).
        self._position = int(state["position"] if "position" in state else state["next_index"])


class WeightedMix(grain.IterDataset):
    """Draws each element from a source picked at random in proportion to its weight."""

    # Grain's own mix costs about a millisecond per element here, more than packing a short
    # document; drawing from a counter-based hash keeps this O(1) and the state one integer
    # plus each source's own.

    def __init__(self, parents: list[grain.IterDataset], weights: list[float], seed: int) -> None:
        super().__init__(parents)
        self._cdf = np.cumsum(np.asarray(weights, np.float64) / np.sum(weights)).tolist()
        self._seed = seed

    def __iter__(self) -> grain.DatasetIterator:
        return _WeightedMixIterator([p.__iter__() for p in self._parents], self._cdf, self._seed)


class _WeightedMixIterator(grain.DatasetIterator):
    """Iterator side of WeightedMix; state: draws so far and each source's state."""

    def __init__(self, parents: list[grain.DatasetIterator], cdf: list[float], seed: int):
        super().__init__(parents)
        self._sources, self._cdf = parents, cdf
        self._key = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
        self._drawn = 0

    def __next__(self) -> Any:
        u = splitmix64(self._key + self._drawn) / 2.0**64
        s = min(bisect.bisect_right(self._cdf, u), len(self._sources) - 1)
        self._drawn += 1
        return next(self._sources[s])

    def get_state(self) -> dict[str, Any]:
        return {"drawn": self._drawn, "sources": [it.get_state() for it in self._sources]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._drawn = int(state["drawn"])
        # "taken": earlier versions counted documents taken per source; continue from there.
        sources = state.get("sources") or [{"position": t} for t in state["taken"]]
        for it, s in zip(self._sources, sources, strict=True):
            it.set_state(s)
