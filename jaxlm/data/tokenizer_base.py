"""The one tokenizer interface (SentencePiece and Hugging Face `tokenizer.json` both offer it),
and the file identity, path and SHA-256, that both implementations share."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol


class Tokenizer(Protocol):
    """What eval, generate, data preparation and training use of a tokenizer."""

    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def unk_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...
    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


class TokenizerFile:
    """The file a tokenizer was loaded from, and the SHA-256 of the bytes it was built from."""

    def __init__(self, data: bytes, path: str) -> None:
        self._path = path
        self._sha256 = hashlib.sha256(data).hexdigest()

    @property
    def path(self) -> str:
        """The file this tokenizer was loaded from."""
        return self._path

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the file's bytes, to detect a tokenizer swapped under a checkpoint."""
        return self._sha256
