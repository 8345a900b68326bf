"""Evaluation of a loaded run: loss, perplexity and bits per byte of text, prepared shards or
the run's validation split, and multiple-choice accuracy."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxlm.data.dataset import prepare_corpus
from jaxlm.data.pipeline import tokenize_documents
from jaxlm.data.shards import open_prepared
from jaxlm.errors import ConfigError
from jaxlm.inference.scoring import (
    batches_of,
    choice_accuracy,
    choice_rows,
    iter_rows,
    read_choice_items,
    read_documents,
    summarize,
)
from jaxlm.models import build_model
from jaxlm.parallel.sharding import data_parallel_size, process_rows, put_batch
from jaxlm.paths import as_path
from jaxlm.runs import Run, check_vocab
from jaxlm.train.step import jit_eval_step, make_eval_step


class Evaluator:
    """A run's parameters where `load_run` sharded them, with compiled scoring steps.

    Batches are split over the data-parallel axes of the run's mesh (data*fsdp); heads and
    the vocabulary over its tensor axis.
    """

    def __init__(self, run: Run, batch_size: int | None = None, progress: bool = True) -> None:
        check_vocab(run)
        self.run, self.progress = run, progress
        cfg = run.cfg
        self.mesh = run.mesh
        dp = data_parallel_size(self.mesh)
        wanted = batch_size or cfg.train.batch_size
        self.batch_size = dp * -(-wanted // dp)  # rows split evenly over the devices
        self.seq_len = cfg.data.seq_len
        if not cfg.model.recurrent:
            self.seq_len = min(self.seq_len, cfg.model.max_seq_len)
        model = build_model(cfg.model)
        self.params = run.params
        shardings = jax.tree.map(lambda x: x.sharding, run.params)
        loss_step = make_eval_step(model, cfg.train.loss_chunk)
        self._loss_fn = jit_eval_step(loss_step, shardings, self.mesh)
        self._loglik_fn = jit_eval_step(_make_loglik_step(model), shardings, self.mesh)

    def _run(self, fn, batches, desc: str, total: int | None = None) -> list:
        """fn(params, batch) over an iterable of batches, results read in order.

        A few batches stay in flight so the device never waits for the host, and the
        progress bar counts finished batches, not dispatched ones. With several processes
        each one feeds its own block of every batch's rows.
        """

        bar = None
        if self.progress and jax.process_index() == 0:
            bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
        pending, results = collections.deque(), []

        def read_one() -> None:
            results.append(jax.device_get(pending.popleft()))
            if bar is not None:
                bar.update()

        for b in batches:
            local = process_rows(b, self.mesh)
            pending.append(fn(self.params, put_batch(local, self.mesh)))
            if len(pending) > 2:
                read_one()
        while pending:
            read_one()
        if bar is not None:
            bar.close()
        return results

    def loss_sums(self, token_docs: Iterable, desc: str = "eval") -> tuple[float, float]:
        """(summed next-token nats, target tokens) over documents packed into seq_len rows."""

        docs = (self._check_ids(d) for d in token_docs)
        batches = batches_of(iter_rows(docs, self.seq_len), self.batch_size)
        nats = tokens = 0.0
        outs = self._run(self._loss_fn, batches, desc)
        if not outs:
            raise ConfigError(f"'{desc}' holds no document of two or more tokens to score.")
        for out in outs:
            nats += float(out["loss_sum"])
            tokens += float(out["tokens"])
        return nats, tokens

    def row_logliks(self, rows: list[dict], desc: str = "choices") -> list[float]:
        """Summed log-probability of each row's weighted targets."""

        for r in rows:
            self._check_ids(r["inputs"])
            self._check_ids(r["targets"])
        total = -(-len(rows) // self.batch_size)
        outs = self._run(self._loglik_fn, batches_of(rows, self.batch_size), desc, total)
        return [float(x) for x in np.concatenate([o["loglik"] for o in outs])[: len(rows)]]

    def _check_ids(self, ids):
        """`ids`, after checking the model can embed every one of them."""

        vocab = self.run.cfg.model.vocab_size
        top = int(np.max(ids)) if len(ids) else 0
        if top >= vocab:
            raise ConfigError(
                f"The data holds token id {top} but the model has only {vocab} embeddings; "
                "it was tokenized with another tokenizer."
            )
        return ids


def _make_loglik_step(model):
    """Per-row summed log-probability of the weighted targets."""

    def step(params, batch):
        logits_BxSxV = model.apply(
            {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
        ).astype(jnp.float32)
        logp_BxSxV = jax.nn.log_softmax(logits_BxSxV, axis=-1)
        tgt_BxS = jnp.take_along_axis(logp_BxSxV, batch["targets"][..., None], axis=-1)[..., 0]
        return {"loglik": jnp.sum(tgt_BxS * batch["weights"], axis=-1)}

    return step


def evaluate_text(ev: Evaluator, path: str | Path) -> dict[str, Any]:
    """Loss, perplexity and bits-per-byte of a .txt/.jsonl file (or a prepared shard dir);
    local, gs:// or s3://."""

    if as_path(path, "--data").is_dir():
        return evaluate_prepared(ev, path)
    docs = read_documents(path, ev.run.cfg.data.doc_chars)
    if not docs:
        raise ConfigError(f"--data '{path}' holds no text; give a file with some.")
    nats, tokens = ev.loss_sums(tokenize_documents(docs, ev.run.tokenizer), as_path(path).name)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"data": str(path), "documents": len(docs), **summarize(nats, tokens, n_bytes)}


# Manifest keys that may hold the UTF-8 byte count of a prepared set's text.
_BYTE_KEYS = ("bytes", "num_bytes", "text_bytes")


def evaluate_prepared(ev: Evaluator, path: str | Path) -> dict[str, Any]:
    """The same for a directory written by `jaxlm data prepare` (token ids, no text)."""
    prepared = open_prepared(path)
    manifest = prepared.manifest
    sha = manifest.get("tokenizer_sha256") or (manifest.get("tokenizer") or {}).get("sha256")
    if sha and sha != ev.run.tokenizer.sha256:
        raise ConfigError(
            f"--data '{path}' was tokenized with another tokenizer (sha256 {sha[:12]}..., the "
            f"checkpoint's is {ev.run.tokenizer.sha256[:12]}...); prepare it with this one."
        )
    docs = (prepared.document(i) for i in range(prepared.num_documents))
    nats, tokens = ev.loss_sums(docs, as_path(path).name)
    n_bytes = next((int(manifest[k]) for k in _BYTE_KEYS if manifest.get(k)), None)
    out = {"data": str(path), "documents": prepared.num_documents}
    out.update(summarize(nats, tokens, n_bytes))
    if n_bytes is None:
        out["bits_per_byte_reason"] = "the prepared set's manifest records no byte count"
    return out


def evaluate_validation(ev: Evaluator, workdir: str | Path) -> dict[str, Any]:
    """The run's own validation split; bytes are those of the decoded documents."""
    if ev.run.cfg.data.streaming:
        raise ConfigError(
            "A streamed run's validation split is every held-out document of its raw files, "
            "which would mean reading the whole corpus; evaluate it on a file with --data."
        )
    docs = prepare_corpus(ev.run.cfg, workdir).val_docs
    nats, tokens = ev.loss_sums(docs, "validation")
    n_bytes = sum(len(ev.run.tokenizer.decode(d).encode("utf-8")) for d in docs)
    return {"data": "validation", "documents": len(docs), **summarize(nats, tokens, n_bytes)}


def evaluate_choices(
    ev: Evaluator, path: str | Path, items: list[dict] | None = None
) -> dict[str, Any]:
    """Multiple-choice accuracy (summed and per-byte log-likelihood) of a JSONL item file."""

    items = read_choice_items(path) if items is None else items
    tok = ev.run.tokenizer
    contexts = tok.encode_batch([it["context"] for it in items], bos=True)
    choices = tok.encode_batch([c for it in items for c in it["choices"]])
    if any(not ids for ids in choices):
        raise ConfigError(f"A choice in '{path}' encodes to no tokens; give non-empty choices.")
    longest = max(len(contexts[i]) + len(c) for i, it in enumerate(items) for c in it["choices"])
    length = min(16 * -(-(longest - 1) // 16), ev.seq_len)  # few shapes, at most seq_len
    rows, k = [], 0
    for ctx, it in zip(contexts, items, strict=True):
        for _ in it["choices"]:
            rows.append(choice_rows(ctx, choices[k], length))
            k += 1
    flat = ev.row_logliks(rows, as_path(path).name)
    logliks, k = [], 0
    for it in items:
        logliks.append(flat[k : k + len(it["choices"])])
        k += len(it["choices"])
    return {"data": str(path), **choice_accuracy(items, logliks), "logliks": logliks}
