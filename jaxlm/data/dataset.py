"""A run's corpus: read works or prepared shards, split, load or train the tokenizer, tokenise."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import paths
from jaxlm.config import RunConfig
from jaxlm.data import chat, corpus, mixture, pipeline, text_cache
from jaxlm.data.raw_stream import RawDocuments
from jaxlm.data.streamed import HeldOut
from jaxlm.data.streams import resolve_streams
from jaxlm.data.tokenizer import SentencePieceTokenizer, load_or_train_tokenizer, load_tokenizer
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.data.views import Concat, approx_len
from jaxlm.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
    """Tokenised train/validation documents and the tokenizer that made them."""

    tokenizer: Tokenizer
    train_docs: Sequence[np.ndarray]  # random access; prepared data is read lazily
    val_docs: Sequence[np.ndarray]
    train_works: list[str]
    val_works: list[str]
    sources: list[pipeline.WeightedSource] | None = None  # weighted train sources (mixtures)
    streams: int = 1  # packed streams per global batch (data.streams resolved)

    def sizes(self) -> str:
        """How much data there is, for the log; never counts a lazy split view."""
        if isinstance(self.train_docs, HeldOut):  # data.streaming: unknown until read
            return f"{len(self.train_works)} file(s) streamed by this process"
        return f"~{approx_len(self.train_docs)} train / ~{approx_len(self.val_docs)} val docs"


def prepare_corpus(
    cfg: RunConfig, workdir: str | os.PathLike, shard: tuple[int, int] | None = None
) -> Corpus:
    """Read works, split by whole works, load or train the tokenizer, tokenise documents.

    Prepared directories (data.corpus or data.sources) are opened instead, checked against
    the run's tokenizer and model, and split by document. `workdir` may be a gs:// or s3://
    URL; the tokenizer and token cache are then kept there. `shard` (index, count), by
    default (process index, process count): which of the processes' blocks of rows this
    process loads, for data.streaming, which reads only this block's files.
    """
    d = cfg.data
    workdir = paths.as_path(workdir, "--workdir") if paths.is_remote(workdir) else Path(workdir)
    if d.chat:
        return _chat_corpus(cfg, workdir)
    if d.streaming:
        return _streamed_corpus(cfg, shard or (jax.process_index(), jax.process_count()))
    prepared = mixture.prepared_paths(cfg)
    if prepared:
        pc = mixture.load_prepared_corpus(cfg, prepared)
        return Corpus(
            tokenizer=pc.tokenizer,
            train_docs=Concat([s.docs for s in pc.sources]),
            val_docs=pc.val_docs,
            train_works=pc.names,
            val_works=pc.names,
            sources=pc.sources,
            streams=resolve_streams(
                d.streams,
                cfg.train.batch_size,
                min(approx_len(s.docs) for s in pc.sources),
                True,
                workdir,
            ),
        )
    works = (
        corpus.load_builtin_works() if d.corpus == "builtin" else corpus.read_text_works(d.corpus)
    )
    train_works, val_works = corpus.train_validation_split(works, d.validation_fraction, d.seed)

    def split_docs(ws):
        return [doc for w in ws for doc in corpus.split_documents(w.text, d.doc_chars)]

    train_text, val_text = split_docs(train_works), split_docs(val_works)
    tok = _run_tokenizer(
        d.tokenizer, str(workdir / "tokenizer.model"), lambda: train_text, cfg.model.vocab_size
    )
    docs = _tokenize_once({"train": train_text, "val": val_text}, tok, workdir, d.cache_dir)
    return Corpus(
        tokenizer=tok,
        train_docs=docs["train"],
        val_docs=docs["val"],
        train_works=[w.name for w in train_works],
        val_works=[w.name for w in val_works],
        streams=resolve_streams(d.streams, cfg.train.batch_size, len(train_text), False, workdir),
    )


def _chat_corpus(cfg: RunConfig, workdir: Path) -> Corpus:
    """Conversations (data.chat) rendered with the tokenizer's chat template, with their
    assistant-token masks; validation is data.chat_validation or a share of data.chat."""
    d = cfg.data
    if d.sources or not d.tokenizer:
        raise ConfigError(
            "data.chat needs data.tokenizer (the checkpoint's) and no data.sources; start it "
            "with `jaxlm finetune sft`."
        )
    tok = load_tokenizer(d.tokenizer)
    template = chat.load_template(d.tokenizer)
    train_docs, train_names = chat.chat_documents(d.chat, tok, template)
    if d.chat_validation:
        val_docs, val_names = chat.chat_documents(d.chat_validation, tok, template)
    else:
        train_docs, val_docs = chat.split_documents(train_docs, d.validation_fraction, d.seed)
        val_names = train_names
    logger.info(
        "Chat data: %d training and %d validation conversations, %s template.",
        len(train_docs), len(val_docs), template.name,
    )  # fmt: skip
    return Corpus(
        tokenizer=tok,
        train_docs=train_docs,
        val_docs=val_docs,
        train_works=train_names,
        val_works=val_names,
        streams=resolve_streams(d.streams, cfg.train.batch_size, len(train_docs), False, workdir),
    )


def _streamed_corpus(cfg: RunConfig, shard: tuple[int, int]) -> Corpus:
    """data.streaming: data.corpus's raw files, tokenized on the fly (data/raw_stream.py).

    Each block of rows streams its own files (every count-th, from `shard`'s index), seeded
    file order per epoch, documents in file order; held-out documents (data/streamed.py) are
    skipped. Validation is every file in sorted order, once, keeping only held-out
    documents: the loop packs just its first train.eval_batches batches, so no process
    reads further than those need.
    """
    d = cfg.data  # config/validate.py has checked data.tokenizer, data.corpus, eval_batches
    inputs = [p.strip() for p in d.corpus.split(",") if p.strip()]
    tok = load_or_train_tokenizer(d.tokenizer, "", lambda: [], cfg.model.vocab_size)  # checks size
    train = RawDocuments(
        inputs, d.tokenizer, seed=d.seed, shard_index=shard[0], shard_count=shard[1]
    )
    val = RawDocuments(inputs, d.tokenizer, repeat=False)
    return Corpus(
        tokenizer=tok,
        train_docs=HeldOut(train, d.validation_fraction, d.seed, validation=False),
        val_docs=HeldOut(val, d.validation_fraction, d.seed, validation=True),
        train_works=[os.path.basename(f) for f in train.files],  # this process's files
        val_works=[os.path.basename(f) for f in val.files],
    )


def _tokenize_once(
    splits: text_cache.Splits, tok: Tokenizer, workdir: text_cache.Dir, cache_dir: str | None
) -> dict[str, list[np.ndarray]]:
    """Token documents of each split: tokenized by process 0 into the workdir's cache (or read
    from it), then read there by the others once process 0 is done."""
    directory = text_cache.cache_directory(workdir, splits, tok)
    if jax.process_index() == 0:
        docs = text_cache.read_cached(directory, splits, cache_dir)
        if docs is None:
            docs = text_cache.tokenize_and_write(directory, splits, tok)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm_text_tokens")
    if jax.process_index() != 0:
        docs = text_cache.read_cached(directory, splits, cache_dir)
        if docs is None:  # the hosts share no disk: tokenize here too
            logger.info("No token cache from process 0 in %s; tokenizing here.", directory)
            docs = {name: pipeline.tokenize_documents(list(t), tok) for name, t in splits.items()}
    return docs


def _run_tokenizer(
    path: str | None, cache_path: str, texts_fn: Callable[[], Iterable[str]], vocab_size: int
) -> Tokenizer:
    """The tokenizer at `path`, else the run's own (cached at `cache_path` or trained there).

    With several processes only process 0 loads or trains the run's own tokenizer; it sends
    the model's bytes to the others, so every process holds the same one and the hosts need
    not share a disk.
    """
    if path or jax.process_count() == 1:
        return load_or_train_tokenizer(path, cache_path, texts_fn, vocab_size)
    tok, error = None, None
    if jax.process_index() == 0:
        try:
            tok = load_or_train_tokenizer(None, cache_path, texts_fn, vocab_size)
        except ConfigError as e:  # the others must hear of it, or they wait forever
            error = e
    model = _from_process_zero(None if tok is None else _read_bytes(tok.path))
    if error is not None:
        raise error
    if model is None:
        raise ConfigError(
            "Process 0 could not load or train the tokenizer (its own error says why); fix "
            "that and start every process again."
        )
    return tok or SentencePieceTokenizer(model, cache_path)


def _read_bytes(path: str) -> bytes:
    return paths.as_path(path).read_bytes() if paths.is_remote(path) else Path(path).read_bytes()


def _from_process_zero(data: bytes | None) -> bytes | None:
    """Process 0's `data` on every process (None where process 0 has none)."""
    n = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if data is None else len(data))))
    if n < 0:
        return None
    buf = np.frombuffer(data, np.uint8) if data is not None else np.zeros(n, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()
