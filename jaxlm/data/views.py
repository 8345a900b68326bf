"""Lazy views over document sources: the seeded hash split, concatenations, subsets.

No view stores a per-document array. The train/validation side of document i is a hash of
(i, seed), so the split is decided on the fly: the training stream walks a permutation of
the whole source and skips held-out documents (data/order.py), validation reads the source
in order and keeps only them. A view's length is counted once, when first asked for, in
blocks (about 11 ns a document, flat memory); the training pipeline never asks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from jaxlm.errors import ConfigError

_MASK64 = (1 << 64) - 1
BLOCK = 1 << 16  # documents hashed per numpy call: large enough to amortise, cache-sized


def splitmix64(x: int | np.ndarray) -> int | np.ndarray:
    """A well-mixed 64-bit hash (Steele et al.'s SplitMix64 finaliser) of a Python int, taken
    mod 2**64, or of each element of an integer array, as uint64: the same bits either way."""
    if isinstance(x, int):  # plain Python ints: about a microsecond, for per-element callers
        return _mix64(x)
    with np.errstate(over="ignore"):  # uint64 products wrap mod 2**64, as the hash wants
        return _mix64(np.asarray(x).astype(np.uint64))


def _mix64(z):
    # `& _MASK64` keeps Python ints to 64 bits; on uint64 arrays it changes nothing.
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class HashSplit:
    """Documents of `docs` on one side of the seeded split, in source order, read on access.

    Document i is held out for validation when the top 53 bits of splitmix64(i ^ salt), as a
    fraction of 2**53, fall below `fraction`; it depends only on (i, seed), so appending
    documents to a source never moves one across the split.
    """

    def __init__(
        self,
        docs: Sequence[np.ndarray],
        fraction: float,
        seed: int,
        validation: bool,
        held_out: list[int | None] | None = None,
    ) -> None:
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"validation_fraction={fraction} must lie strictly between 0 and 1.")
        self.source, self.fraction, self.seed, self.validation = docs, fraction, seed, validation
        self._salt = splitmix64(seed & _MASK64)
        # u < fraction  <=>  top53 < fraction * 2**53 (exact: a power-of-two scale), so an
        # integer compare gives the same split as the float one of earlier versions.
        self._threshold = int(np.ceil(fraction * float(1 << 53)))
        # Held-out documents of the source, counted once and shared by both sides' views.
        self._held_out = [None] if held_out is None else held_out
        self._chunk = (0, 0, np.zeros(0, np.int64))  # (rank of first, next source index, kept)

    def keeps(self, i: int) -> bool:
        """Whether source document i belongs to this side."""
        return ((splitmix64(int(i) ^ self._salt) >> 11) < self._threshold) == self.validation

    def keeps_array(self, i_N: np.ndarray) -> np.ndarray:
        """keeps() of each source index in an integer array."""
        top_N = splitmix64(np.asarray(i_N).astype(np.uint64) ^ np.uint64(self._salt)) >> 11
        return (top_N < np.uint64(self._threshold)) == self.validation

    def _kept_in(self, start: int, validation: bool | None = None) -> np.ndarray:
        stop = min(start + BLOCK, len(self.source))
        i_N = np.arange(start, stop, dtype=np.int64)
        keep_N = self.keeps_array(i_N)
        return i_N[keep_N if validation in (None, self.validation) else ~keep_N]

    def __len__(self) -> int:
        n = len(self.source)
        if self._held_out[0] is None:  # counted once: O(N) time (~11 ns a document), flat memory
            self._held_out[0] = sum(len(self._kept_in(s, True)) for s in range(0, n, BLOCK))
        return self._held_out[0] if self.validation else n - self._held_out[0]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        first, nxt, kept = self._chunk
        if i < first:  # behind the cursor: scan again from the start
            first, nxt, kept = 0, 0, np.zeros(0, np.int64)
        # Sequential reads (eval, len) move the cursor one block at a time: O(1) amortised.
        while i >= first + len(kept):
            if nxt >= len(self.source) or i < 0:
                raise IndexError(f"document {i} is out of range of this split")
            first, nxt, kept = (
                first + len(kept),
                min(nxt + BLOCK, len(self.source)),
                self._kept_in(nxt),
            )
        self._chunk = (first, nxt, kept)
        return self.source[int(kept[i - first])]

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.source), BLOCK):
            for i in self._kept_in(start).tolist():
                yield self.source[i]

    def any(self) -> bool:
        """Whether the side holds a document; stops at the first block that has one."""
        return any(len(self._kept_in(s)) for s in range(0, len(self.source), BLOCK))

    __bool__ = any  # `if docs:` must not count them all


def approx_len(docs: Sequence[np.ndarray]) -> int:
    """len(docs), but a split view not yet counted gives its expected size from the fraction,
    so a log line or a default never pays a counting pass over a billion documents."""
    if isinstance(docs, HashSplit) and docs._held_out[0] is None:
        share = docs.fraction if docs.validation else 1.0 - docs.fraction
        return round(len(docs.source) * share)
    if isinstance(docs, Concat) and docs._starts_ is None:
        return sum(approx_len(p) for p in docs.parts)
    return len(docs)


def split_views(
    docs: Sequence[np.ndarray], fraction: float, seed: int
) -> tuple[HashSplit, HashSplit]:
    """(train, validation) views of `docs` under the seeded hash split; no index list."""
    held_out: list[int | None] = [None]
    return (
        HashSplit(docs, fraction, seed, False, held_out),
        HashSplit(docs, fraction, seed, True, held_out),
    )


class Subset:
    """The documents of `docs` at `indices`, in that order, read on access."""

    def __init__(self, docs: Sequence[np.ndarray], indices: np.ndarray) -> None:
        self.docs = docs
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.docs[int(self.indices[i])]


class Concat:
    """Several document sequences end to end, read on access; lengths taken when first needed."""

    def __init__(self, parts: Sequence[Sequence[np.ndarray]]) -> None:
        self.parts = list(parts)
        self._starts_: np.ndarray | None = None

    @property
    def _starts(self) -> np.ndarray:
        # Lazy: a split view counts its documents only when asked (see the module docstring).
        if self._starts_ is None:
            self._starts_ = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        return self._starts_

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __bool__(self) -> bool:
        return any(bool(p) for p in self.parts)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} is out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k][i - int(self._starts[k])]

    def __iter__(self) -> Iterator[np.ndarray]:
        for part in self.parts:
            yield from part
