"""A stateless keyed permutation of [0, n): a Feistel network with cycle-walking.

Shuffling by a stored permutation costs 8 bytes per document on every host (30 GiB at 1e9
documents) and a second of start-up per epoch at 2e7. A keyed bijection instead maps a
position to a document on demand: the memory is a handful of round keys whatever n is, the
state of a shuffled stream is one counter, and each position costs the same whether it is
computed alone (a Python int) or in a block (a numpy array, a few dozen ns per position).

The network permutes [0, 2**bits), the smallest power of two >= n (at least 4): the bits are
cut into a high and a low half, and round r replaces one half by itself XOR a splitmix64
hash of the other half and of round key r (alternating halves, so unequal halves work and
each round is its own inverse). Positions that land at or beyond n are walked along their
cycle until they land inside [0, n) (cycle-walking), which restricts a bijection of the
larger domain to a bijection of [0, n); as the domain is < 2n (< 4n for n < 4), that takes
under two steps on average.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.views import splitmix64

ROUNDS = 6  # 4 make a pseudo-random permutation (Luby-Rackoff); 2 more for small domains
_MASK64 = (1 << 64) - 1


def round_keys(seed: int, epoch: int = 0, rounds: int = ROUNDS) -> list[int]:
    """The 64-bit round keys of the permutation for (seed, epoch)."""
    # Chained, not XOR-ed, so (seed=a, epoch=b) and (seed=b, epoch=a) get different keys.
    base = splitmix64((splitmix64(seed & _MASK64) + epoch) & _MASK64)
    return [splitmix64((base + r) & _MASK64) for r in range(rounds)]


class Permutation:
    """A seeded bijection of [0, n); `perm(i)` for one position, `perm.take(i_N)` for many."""

    def __init__(self, n: int, seed: int, epoch: int = 0, rounds: int = ROUNDS) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self._lo_bits = bits // 2
        self._lo_mask = (1 << self._lo_bits) - 1
        self._hi_mask = (1 << (bits - self._lo_bits)) - 1
        self._keys = round_keys(seed, epoch, rounds)
        self._keys_u64 = [np.uint64(k) for k in self._keys]

    def _feistel(self, x: int) -> int:
        hi, lo = x >> self._lo_bits, x & self._lo_mask
        for r, k in enumerate(self._keys):
            if r % 2 == 0:
                lo ^= splitmix64(hi ^ k) & self._lo_mask
            else:
                hi ^= splitmix64(lo ^ k) & self._hi_mask
        return (hi << self._lo_bits) | lo

    def __call__(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} is out of range [0, {self.n})")
        x = self._feistel(i)
        while x >= self.n:  # cycle-walk back into [0, n)
            x = self._feistel(x)
        return x

    def _feistel_array(self, x_N: np.ndarray) -> np.ndarray:
        shift = np.uint64(self._lo_bits)
        hi_N, lo_N = x_N >> shift, x_N & np.uint64(self._lo_mask)
        lo_mask, hi_mask = np.uint64(self._lo_mask), np.uint64(self._hi_mask)
        for r, k in enumerate(self._keys_u64):
            if r % 2 == 0:
                lo_N ^= splitmix64(hi_N ^ k) & lo_mask
            else:
                hi_N ^= splitmix64(lo_N ^ k) & hi_mask
        return (hi_N << shift) | lo_N

    def take(self, i_N: np.ndarray) -> np.ndarray:
        """The images of an array of positions in [0, n), as int64."""
        i_N = np.asarray(i_N)
        if i_N.size and (i_N.min() < 0 or i_N.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        x_N = self._feistel_array(i_N.astype(np.uint64))
        n = np.uint64(self.n)
        out_N = x_N >= n
        while out_N.any():  # cycle-walk only the positions still outside
            x_N[out_N] = self._feistel_array(x_N[out_N])
            out_N = x_N >= n
        return x_N.astype(np.int64)

    def block(self, start: int, stop: int) -> np.ndarray:
        """The images of positions start, ..., stop - 1 (int64)."""
        return self.take(np.arange(start, stop, dtype=np.int64))
