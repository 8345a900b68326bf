"""SentencePiece tokenizers (load, train atomically, cache, encode, decode), and `load_tokenizer`,
which opens either kind of tokenizer file behind the one `Tokenizer` interface."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import sentencepiece as spm

from jaxlm import paths
from jaxlm.data.hf_tokenizer import HFTokenizer
from jaxlm.data.tokenizer_base import Tokenizer, TokenizerFile
from jaxlm.errors import ConfigError

# Fixed special ids, so every model trained here lays out its embedding table the same way.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class SentencePieceTokenizer(TokenizerFile):
    """A SentencePiece model plus the hash of the file it came from."""

    def __init__(self, model_bytes: bytes, path: str) -> None:
        # Loading from the same bytes that were hashed means `sha256` describes exactly this model.
        super().__init__(model_bytes, path)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_bytes)

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """Load a SentencePiece `.model` file (a local path, or a gs:// / s3:// URL)."""
        try:
            if paths.is_remote(path):
                model_bytes = paths.as_path(path, "The tokenizer").read_bytes()
            else:
                with open(path, "rb") as f:
                    model_bytes = f.read()
            return cls(model_bytes, path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(
                f"Cannot read a SentencePiece model at {path!r} ({e}); point data.tokenizer at an "
                "existing .model file or leave it unset to train one."
            ) from e

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special ids included."""
        return self._sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        """Id of the padding piece."""
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        """Id of the unknown piece."""
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-document piece."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document piece."""
        return self._sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of one text, optionally wrapped in bos/eos."""
        return self._sp.Encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Token ids of many texts, encoded on several threads (-1: all cores)."""
        return self._sp.Encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; padding is skipped, bos/eos decode to nothing."""
        pad = self.pad_id
        return self._sp.Decode([int(i) for i in ids if int(i) != pad])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(path={self._path!r}, vocab_size={self.vocab_size})"


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-blank lines of the texts: SentencePiece's unit of training input."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,
    user_defined_symbols: Sequence[str] = (),
) -> Tokenizer:
    """Train a SentencePiece model on texts and write `.model` and `.vocab` atomically.

    pad/unk/bos/eos keep jaxlm's fixed ids 0-3; `user_defined_symbols` become single pieces
    (ids from 4 on, after the newline piece) that the tokenizer never splits.
    A gs:// or s3:// `model_path` is trained locally, then put `.vocab` first, `.model` last.
    """
    if not model_path.endswith(".model"):
        raise ConfigError(f"Tokenizer path {model_path!r} must end in '.model'; rename it.")
    if paths.is_remote(model_path):
        paths.as_path(model_path, "The tokenizer")  # fail on a missing client before training
        with tempfile.TemporaryDirectory(prefix="jaxlm-spm-") as d:
            local = os.path.join(d, "tokenizer.model")
            train_tokenizer(
                texts, local, vocab_size, model_type, byte_fallback, input_sentence_size,
                num_threads, user_defined_symbols,
            )  # fmt: skip
            with open(local[: -len(".model")] + ".vocab", "rb") as f:
                paths.write_bytes_atomic(model_path[: -len(".model")] + ".vocab", f.read())
            with open(local, "rb") as f:
                model_bytes = f.read()
        paths.write_bytes_atomic(model_path, model_bytes)
        return SentencePieceTokenizer(model_bytes, model_path)
    directory = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(directory, exist_ok=True)
    final_prefix = model_path[: -len(".model")]
    # A temporary prefix in the same directory keeps os.replace a same-filesystem rename, so a
    # crash mid-training leaves at worst stray temp files, never a truncated .model.
    # A fresh name rather than mkstemp, whose file would keep mode 0600: SentencePiece
    # creates the files itself, with the user's umask.
    temp_prefix = os.path.join(directory, f".spm-{uuid.uuid4().hex}")
    temp_model = temp_prefix + ".model"
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_lines(texts),
            model_prefix=temp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            # Small corpora cannot always reach the requested size; the caller checks the size.
            hard_vocab_limit=False,
            # Lossless text: no NFKC, no whitespace collapsing, no invented leading space, so
            # decode(encode(s)) == s and indentation and blank lines survive.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            # Training sees lines, so newline would otherwise never become a piece of its own.
            user_defined_symbols=["\n", *[u for u in user_defined_symbols if u != "\n"]],
            character_coverage=1.0 if byte_fallback else 0.9995,
            # Sample at most this many lines (shuffled) to bound time and memory on big corpora.
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        # Keep SentencePiece's reason but drop its source-file prefix ("src/x.cc(638) [...] ").
        reason = str(e).rsplit("] ", 1)[-1].strip() or str(e)
        raise ConfigError(
            f"SentencePiece could not train a vocabulary of {vocab_size} pieces ({reason}); raise "
            "the vocabulary size (model.vocab_size, or --vocab-size; byte fallback alone takes "
            "256 + 4 special ids) or give more text."
        ) from e
    else:
        # The .model is renamed last: its presence is what marks a finished cache entry.
        os.replace(temp_prefix + ".vocab", final_prefix + ".vocab")
        os.replace(temp_model, model_path)
    finally:
        for leftover in (temp_model, temp_prefix + ".vocab"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return SentencePieceTokenizer.load(model_path)


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer file: a SentencePiece `.model`, or a Hugging Face `tokenizer.json`.

    Both kinds offer the `Tokenizer` interface (ids of the special pieces, encode,
    encode_batch, decode, vocab_size, sha256, path), so eval, generate and data preparation
    need not know which one they hold.
    """
    if str(path).endswith(".json"):
        return HFTokenizer.load(str(path))
    return SentencePieceTokenizer.load(str(path))


def load_or_train_tokenizer(
    path: str | None,
    cache_path: str,
    texts_fn: Callable[[], Iterable[str]],
    vocab_size: int,
) -> Tokenizer:
    """Load `path`, else the model cached at `cache_path`, else train one there; check its size."""
    trained = False
    if path:
        tokenizer = load_tokenizer(path)
    elif (
        paths.as_path(cache_path, "The tokenizer").exists()
        if paths.is_remote(cache_path)
        else os.path.exists(cache_path)
    ):
        tokenizer = SentencePieceTokenizer.load(cache_path)
    else:
        tokenizer = train_tokenizer(texts_fn(), cache_path, vocab_size)
        trained = True
    # Hugging Face checkpoints often pad the embedding past the tokenizer (e.g. to a multiple
    # of 64); ids beyond the tokenizer are then never fed, so only a smaller model is an error.
    padded_ok = str(tokenizer.path).endswith(".json") and tokenizer.vocab_size < vocab_size
    if tokenizer.vocab_size != vocab_size and not padded_ok:
        reason = " (the training text was too small to reach that size)" if trained else ""
        raise ConfigError(
            f"Tokenizer {tokenizer.path!r} has vocab size {tokenizer.vocab_size} but the model "
            f"expects {vocab_size}{reason}; set model.vocab_size={tokenizer.vocab_size} or point "
            "data.tokenizer at a matching model."
        )
    return tokenizer
