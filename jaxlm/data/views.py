"""Lazy random-access views over document sources: subsets, concatenations, hash splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlm.errors import ConfigError


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
    """Several document sequences end to end, read on access."""

    def __init__(self, parts: Sequence[Sequence[np.ndarray]]) -> None:
        self.parts = list(parts)
        self._starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} is out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k][i - int(self._starts[k])]


_MASK64 = (1 << 64) - 1


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


def hash_split(n_docs: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices; document i's side depends only on (i, seed).

    Stable: appending documents to a source never moves an existing one across the split.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation_fraction={fraction} must lie strictly between 0 and 1.")
    index_N = np.arange(n_docs, dtype=np.uint64)
    salt = splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    u_N = (splitmix64(index_N ^ salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    held_out = u_N < fraction
    return np.nonzero(~held_out)[0], np.nonzero(held_out)[0]
