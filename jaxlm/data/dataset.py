"""A run's corpus: read works or prepared shards, split, load or train the tokenizer, tokenise."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxlm.config import RunConfig
from jaxlm.data import corpus, mixture, pipeline
from jaxlm.data.tokenizer import load_or_train_tokenizer
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.data.views import Concat


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


def prepare_corpus(cfg: RunConfig, workdir: Path) -> Corpus:
    """Read works, split by whole works, load or train the tokenizer, tokenise documents.

    Prepared directories (data.corpus or data.sources) are opened instead, checked against
    the run's tokenizer and model, and split by document.
    """
    d = cfg.data
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
            streams=mixture.default_streams(cfg, prepared=True),
        )
    works = (
        corpus.load_builtin_works() if d.corpus == "builtin" else corpus.read_text_works(d.corpus)
    )
    train_works, val_works = corpus.train_validation_split(works, d.validation_fraction, d.seed)

    def split_docs(ws):
        return [doc for w in ws for doc in corpus.split_documents(w.text, d.doc_chars)]

    train_text, val_text = split_docs(train_works), split_docs(val_works)
    tok = load_or_train_tokenizer(
        d.tokenizer, str(workdir / "tokenizer.model"), lambda: train_text, cfg.model.vocab_size
    )
    return Corpus(
        tokenizer=tok,
        train_docs=pipeline.tokenize_documents(train_text, tok),
        val_docs=pipeline.tokenize_documents(val_text, tok),
        train_works=[w.name for w in train_works],
        val_works=[w.name for w in val_works],
        streams=mixture.default_streams(cfg, prepared=False),
    )
