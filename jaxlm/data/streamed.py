"""data.streaming: the train/validation split of documents tokenized on the fly, and the guard
that keeps a streamed data position on the process count it was saved with.

A streamed document has no stable index (the file order is permuted each epoch and each
process reads its own files), so its side of the split is a keyed hash of its token ids:
the same document is held out in every epoch, on any process count, and exact duplicates
fall on one side, so none leaks from validation into training.
"""

from __future__ import annotations

import hashlib
from typing import Any

import grain
import numpy as np

from jaxlm.errors import ConfigError


class HeldOut(grain.IterDataset):
    """The documents of `parent` on one side of the seeded content-hash split, in its order."""

    def __init__(
        self, parent: grain.IterDataset, fraction: float, seed: int, validation: bool
    ) -> None:
        super().__init__(parent)
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"validation_fraction={fraction} must lie strictly between 0 and 1.")
        self.validation = validation
        self._key = int(seed).to_bytes(8, "little", signed=True)
        # A document is held out when the top 53 bits of its hash, as a fraction of 2**53,
        # fall below `fraction` (the rule of views.HashSplit, keyed by content, not index).
        self._threshold = int(np.ceil(fraction * float(1 << 53)))

    def keeps(self, doc: np.ndarray) -> bool:
        """Whether the token document belongs to this side."""
        data = np.ascontiguousarray(doc, np.int32).tobytes()
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self._key).digest(), "little")
        return ((h >> 11) < self._threshold) == self.validation

    def __iter__(self) -> grain.DatasetIterator:
        return _HeldOutIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"HeldOut(validation={self.validation})"


class _HeldOutIterator(grain.DatasetIterator):
    """Iterator side of HeldOut; its state is the parent's (a skipped document is re-read)."""

    def __init__(self, parent: grain.DatasetIterator, ds: HeldOut) -> None:
        super().__init__(parent)
        self._ds = ds

    def __next__(self) -> np.ndarray:
        while True:
            doc = next(self._parent)
            if self._ds.keeps(doc):
                return doc

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class ProcessBound(grain.IterDataset):
    """Pass-through whose state is keyed by "process I of N", so a restore elsewhere fails."""

    # The state sits under {"streams": {key: ...}} as the prepared pipeline's does: restoring
    # on another process count, the checkpointer merges every process's "streams" (see
    # train/checkpoint.py), this process's key is then missing and set_state says why.

    def __init__(self, parent: grain.IterDataset, index: int, count: int) -> None:
        super().__init__(parent)
        self.key, self.count = f"raw_{index}_of_{count}", count

    def __iter__(self) -> grain.DatasetIterator:
        return _ProcessBoundIterator(self._parent.__iter__(), self)


class _ProcessBoundIterator(grain.DatasetIterator):
    """Iterator side of ProcessBound."""

    def __init__(self, parent: grain.DatasetIterator, ds: ProcessBound) -> None:
        super().__init__(parent)
        self._ds = ds

    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"streams": {self._ds.key: self._parent.get_state()}}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("streams")
        if not isinstance(saved, dict) or self._ds.key not in saved:
            raise ConfigError(
                f"The checkpoint's data position is not that of a streamed run "
                f"(data.streaming=true) on {self._ds.count} process(es); a streamed run "
                "resumes only with the process count and data settings it was saved with."
            )
        self._parent.set_state(saved[self._ds.key])
