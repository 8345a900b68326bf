"""A synthetic source of any number of token documents, each made from a hash of its index.

For benchmarks and tests at web scale: no text, no files and nothing stored per document,
so 1e9 documents cost what 10 do, and what a pipeline spends on them is its own.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.views import splitmix64

_MASK64 = (1 << 64) - 1


class SyntheticDocs:
    """`n` documents [bos, ids..., eos]; document i's length and ids are hashes of (seed, i).

    Lengths are uniform in [2, 2 * mean_tokens - 2], so they average `mean_tokens`; ids lie
    in [first_id, vocab_size). Picklable: a worker process rebuilds it from four integers.
    """

    def __init__(
        self,
        n: int,
        mean_tokens: int = 256,
        vocab_size: int = 32000,
        seed: int = 0,
        bos: int = 2,
        eos: int = 3,
        first_id: int = 4,
    ) -> None:
        if n < 0 or mean_tokens < 2 or vocab_size <= first_id:
            raise ValueError(
                f"need n >= 0, mean_tokens >= 2, vocab_size > {first_id}; got {n}, "
                f"{mean_tokens}, {vocab_size}"
            )
        self.n, self.mean_tokens, self.vocab_size = int(n), int(mean_tokens), int(vocab_size)
        self.seed, self.bos, self.eos, self.first_id = seed, bos, eos, first_id
        self._key = splitmix64((seed & _MASK64) ^ 0x5EED)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"document {i} is out of range [0, {self.n})")
        h = splitmix64(self._key ^ i)
        length = 2 + h % (2 * self.mean_tokens - 3)
        # Token j of the document: a hash of (document hash, j), so documents differ.
        ids_L = splitmix64(np.uint64(h) + np.arange(length - 2, dtype=np.uint64))
        doc = np.empty(length, np.int32)
        doc[0], doc[-1] = self.bos, self.eos
        doc[1:-1] = ids_L % np.uint64(self.vocab_size - self.first_id) + np.uint64(self.first_id)
        return doc

    @property
    def num_tokens_estimate(self) -> float:
        """Expected tokens over all documents (bos and eos included)."""
        return float(self.n) * self.mean_tokens
