"""Training data from prepared directories: open, check against the run, split, weight."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxlm import paths
from jaxlm.config import RunConfig
from jaxlm.data.pipeline import WeightedSource
from jaxlm.data.shards import PreparedShards, is_prepared, open_prepared
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.data.views import Concat, split_views
from jaxlm.errors import ConfigError


@dataclasses.dataclass
class PreparedCorpus:
    """The run's tokenizer, weighted training sources and held-out documents."""

    tokenizer: object
    sources: list[WeightedSource]
    val_docs: Sequence[np.ndarray]
    names: list[str]


def prepared_paths(cfg: RunConfig) -> list[tuple[str, float]] | None:
    """(directory, weight) of each prepared source the config names, or None for text corpora."""
    d = cfg.data
    if d.sources:
        return [(str(s["path"]), float(s.get("weight", 1.0))) for s in d.sources]
    if d.corpus != "builtin" and is_prepared(d.corpus):
        return [(d.corpus, 1.0)]
    return None


def _check_matches(ds: PreparedShards, tok, vocab_size: int) -> None:
    """One clear error when shards were made by another tokenizer or overflow the model."""
    meta = ds.manifest["tokenizer"]
    if meta["sha256"] != tok.sha256:
        raise ConfigError(
            f"{ds.directory} was tokenized with {meta['path']} (sha256 {meta['sha256'][:12]}…), "
            f"not with the run's tokenizer {tok.path} (sha256 {tok.sha256[:12]}…); set "
            "data.tokenizer to the tokenizer it was prepared with, or prepare it again."
        )
    if ds.max_token_id >= vocab_size:
        raise ConfigError(
            f"{ds.directory} holds token id {ds.max_token_id}, but model.vocab_size={vocab_size}; "
            f"set model.vocab_size={meta['vocab_size']}."
        )


def _is_file(path: str) -> bool:
    return (
        paths.as_path(path, "The tokenizer").is_file()
        if paths.is_remote(path)
        else Path(path).is_file()
    )


def load_prepared_corpus(cfg: RunConfig, sources: list[tuple[str, float]]) -> PreparedCorpus:
    """Open every prepared source, check it against the run, and split it by document;
    shards of gs:// or s3:// sources are copied into data.cache_dir to be read."""
    d = cfg.data
    opened = [open_prepared(p, cache_dir=d.cache_dir) for p, _ in sources]
    tok_path = d.tokenizer or opened[0].manifest["tokenizer"]["path"]
    if not d.tokenizer and not _is_file(tok_path):
        raise ConfigError(
            f"The tokenizer {tok_path} recorded in {opened[0].directory}/manifest.json is "
            "gone; set data.tokenizer to a copy of it."
        )
    tok = load_tokenizer(tok_path)
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"Tokenizer {tok.path} has vocab size {tok.vocab_size} but the model expects "
            f"{cfg.model.vocab_size}; set model.vocab_size={tok.vocab_size}."
        )
    weighted, val_parts = [], []
    for ds, (path, weight) in zip(opened, sources, strict=True):
        _check_matches(ds, tok, cfg.model.vocab_size)
        # Views, not index lists: the split is a hash of each document's index (data/views.py).
        train, val = split_views(ds, d.validation_fraction, d.seed)
        if not train.any():
            raise ConfigError(
                f"{path} has {ds.num_documents} document(s), none left for training after "
                f"holding out data.validation_fraction={d.validation_fraction}; add documents."
            )
        mean_tokens = ds.num_tokens / max(ds.num_documents, 1)
        weighted.append(WeightedSource(train, weight, path, mean_tokens))
        val_parts.append(val)
    return PreparedCorpus(tok, weighted, Concat(val_parts), [p for p, _ in sources])
