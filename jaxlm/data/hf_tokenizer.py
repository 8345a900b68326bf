"""A Hugging Face `tokenizer.json` (GPT-2 byte-level BPE, Llama-3, ...) behind jaxlm's
tokenizer interface, through the `tokenizers` library.

Special ids come from the files transformers keeps beside `tokenizer.json`: the token
strings in `tokenizer_config.json` and `special_tokens_map.json`, then the ids in a
`config.json`, and last the usual names of special tokens (`<s>`, `<|endoftext|>`, ...).
A role nobody names gets id -1, as SentencePiece reports a disabled piece.
GPT-2 names no padding token, so its `pad_id` is -1: padding is the caller's choice (the
EOS id is the usual one) and decoding never drops a real token for being "padding".

`encode` never adds special tokens on its own (the tokenizer's post-processor is off);
`bos=`/`eos=` add them, as with SentencePiece. `decode` skips special tokens, as
SentencePiece decodes its control pieces to nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer as _RustTokenizer

from jaxlm import paths
from jaxlm.data.tokenizer_base import TokenizerFile
from jaxlm.errors import ConfigError

ROLES = ("pad", "unk", "bos", "eos")
# Last resort for a tokenizer.json standing alone: the special tokens these names usually are
# (GPT-2, Llama-2, Llama-3 and BERT-style vocabularies).
USUAL_NAMES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
}


def _content(token: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _read_json(path: str) -> dict[str, Any]:
    try:
        if paths.is_remote(path):
            data = json.loads(paths.as_path(path).read_text(encoding="utf-8"))
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _special_ids(tok: _RustTokenizer, directory: str) -> dict[str, int]:
    """Ids of the special roles named by the HF files in `directory` (-1 where none is)."""
    ids = dict.fromkeys(ROLES, -1)
    # Later sources only fill what earlier ones left unnamed.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(os.path.join(directory, name))
        for role in ROLES:
            token = _content(data.get(f"{role}_token"))
            tid = tok.token_to_id(token) if token is not None else None
            if ids[role] < 0 and tid is not None:
                ids[role] = int(tid)
    config = _read_json(os.path.join(directory, "config.json"))
    size = tok.get_vocab_size(with_added_tokens=True)
    for role in ROLES:
        value = config.get(f"{role}_token_id")
        if isinstance(value, list):  # Llama-3 lists several end ids; the first ends text
            value = value[0] if value else None
        if ids[role] < 0 and isinstance(value, int) and 0 <= value < size:
            ids[role] = value
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for role in ROLES:
        name = next((n for n in USUAL_NAMES[role] if n in specials), None)
        if ids[role] < 0 and name is not None:
            ids[role] = int(specials[name])
    return ids


class HFTokenizer(TokenizerFile):
    """A `tokenizers` tokenizer plus its special ids and the hash of its file."""

    def __init__(self, data: bytes, path: str, directory: str | None = None) -> None:
        try:
            self._tok = _RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise ConfigError(
                f"Cannot read a Hugging Face tokenizer at {path!r} ({e}); point at a valid "
                "tokenizer.json."
            ) from e
        super().__init__(data, path)
        self._tok.no_padding()
        self._tok.no_truncation()
        found = _special_ids(self._tok, directory) if directory else {}
        self._ids = {role: int(found.get(role, -1)) for role in ROLES}
        added = self._tok.get_added_tokens_decoder().items()
        self._skip = {int(i) for i, t in added if t.special}
        self._skip |= {i for i in self._ids.values() if i >= 0}

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        """Load `tokenizer.json`, taking special ids from the HF files beside it."""
        try:
            if paths.is_remote(path):
                data = paths.as_path(path, "The tokenizer").read_bytes()
            else:
                with open(path, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise ConfigError(
                f"Cannot read a Hugging Face tokenizer at {path!r} ({e}); point at an existing "
                "tokenizer.json."
            ) from e
        if paths.is_remote(path):  # the HF files beside it are read from the store too
            return cls(data, path, path.rstrip("/").rsplit("/", 1)[0])
        return cls(data, path, os.path.dirname(os.path.abspath(path)))

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """Id of the padding token, or -1 when the tokenizer names none (GPT-2)."""
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        """Id of the unknown token, or -1 (byte-level BPE never needs one)."""
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-text token, or -1."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        """Id of the end-of-text token, or -1."""
        return self._ids["eos"]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id >= 0:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id >= 0:
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of one text, optionally wrapped in bos/eos."""
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Token ids of many texts; `tokenizers` parallelises unless num_threads == 1."""
        if num_threads == 1:
            return [self.encode(t, bos, eos) for t in texts]
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; special tokens (bos, eos, pad, ...) decode to nothing."""
        return self._tok.decode([int(i) for i in ids if int(i) not in self._skip])

    def id_to_token(self, i: int) -> str:
        """The token string of an id (as stored in tokenizer.json)."""
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self._path!r}, vocab_size={self.vocab_size})"
