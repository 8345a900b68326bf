"""`jaxlm bench data`: corpus preparation and pipeline throughput against what training eats.

Rows measured on the built-in Shakespeare corpus:
  prepare (N workers)     tokens/s tokenized and written by `jaxlm data prepare`
  pipeline: <source>      tokens/s of packed batches one process produces, after warm-up
  train step              tokens/s the configured model consumes (timed real train steps)
The pipeline rows also give their ratio to the train step (the issue asks for >= 10x).

With `documents` (bench_scale): a synthetic source of that many documents, each made from a
hash of its index, through the real split + shuffle + pack pipeline, each case in a fresh
process: host peak memory growth, time to the first batch, and tokens/s, at 1e6, 1e8, ...
documents up to the number asked for, and with 1 and 2 worker processes at the largest.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import sentencepiece

from jaxlm.bench import report
from jaxlm.bench.train import bench_train
from jaxlm.config import RunConfig
from jaxlm.data import corpus
from jaxlm.data.dataset import prepare_corpus
from jaxlm.data.mixture import load_prepared_corpus
from jaxlm.data.pipeline import WeightedSource, make_train_iterator
from jaxlm.data.prepare import prepare
from jaxlm.data.streams import default_streams
from jaxlm.data.synthetic import SyntheticDocs
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.data.views import split_views

COLUMNS = (("what", "what", "s"), ("tokens/s", "tokens/s", ",.0f"), ("note", "note", "s"))
SCALE_COLUMNS = (
    ("documents", "documents", ".0e"),
    ("workers", "workers", "d"),
    ("first batch (s)", "first_batch_s", ".2f"),
    ("host peak RSS growth (MiB)", "rss_growth_mib", ".1f"),
    ("tokens/s", "tokens/s", ",.0f"),
)


def environment() -> dict[str, Any]:
    """The benchmarks' environment plus the data libraries' versions and the machine's load."""
    return {
        **report.environment(),
        # Other work on the machine slows the train step more than the pipeline: say how much.
        "load average (1 min)": round(os.getloadavg()[0], 1),
        "grain": getattr(grain, "__version__", "?"),
        "numpy": np.__version__,
        "sentencepiece": sentencepiece.__version__,
    }


def _time_pipeline(it: Iterator[dict[str, np.ndarray]], batches: int, warmup: int) -> float:
    """Tokens per second of an iterator of batches, after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["inputs"].size
    return tokens / (time.perf_counter() - t0)


def _time_prepare(root: Path, copies: int, workers: int, cfg: RunConfig) -> tuple[str, list]:
    """Write the built-in corpus as JSONL, train a tokenizer, and time `data prepare` with 1
    and `workers` processes; the tokenizer's path and one row per worker count."""
    works = corpus.load_builtin_works()
    # The same documents the in-memory path trains on, one JSONL file per work, so the
    # prepared rows compare like with like.
    text_dir = root / "text"
    text_dir.mkdir()
    for w in works:
        docs = corpus.split_documents(w.text, cfg.data.doc_chars)
        lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
        for copy in range(copies):  # enough text that process start-up is amortised
            (text_dir / f"{w.name}-{copy}.jsonl").write_text(lines, encoding="utf-8")
    # The tokenizer is trained to the model's vocabulary size.
    tok = train_tokenizer((w.text for w in works), str(root / "tok.model"), cfg.model.vocab_size)
    total_bytes = copies * sum(len(w.text.encode("utf-8")) for w in works)
    rows = []
    for n in sorted({1, max(1, workers)}):
        t0 = time.perf_counter()
        man = prepare(
            [str(text_dir / "*.jsonl")], tok.path, root / f"prepared-{n}",
            workers=n, shard_bytes=total_bytes // 8 + 1, progress=False, log=lambda m: None,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        note = f"{man['tokens']:,} tokens, {total_bytes / 1e6:.1f} MB in {seconds:.2f} s"
        rows.append(
            {
                "what": f"data prepare, {n} worker(s)",
                "tokens/s": man["tokens"] / seconds,
                "note": note,
            }
        )
    return tok.path, rows


def bench_data(
    cfg: RunConfig,
    *,
    batches: int = 200,
    warmup: int = 20,
    train_steps: int = 10,
    train_tokens_per_s: float | None = None,
    workers: int = 1,
    copies: int = 3,
) -> list[dict[str, Any]]:
    """Rows of tokens/s: `data prepare`, the pipeline over four kinds of source, and the train
    step of `cfg` (timed, unless `train_tokens_per_s` is given)."""
    d, t = cfg.data, cfg.train
    with tempfile.TemporaryDirectory(prefix="jaxlm-bench-data-") as tmp:
        root = Path(tmp)
        tok_path, rows = _time_prepare(root, copies, workers, cfg)
        prepared = str(root / "prepared-1")
        # A second copy under another name, as the second source of a mixture.
        shutil.copytree(prepared, root / "prepared-1b")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, tokenizer=tok_path))
        text_corpus = prepare_corpus(cfg, root / "run")
        pc = load_prepared_corpus(cfg, [(prepared, 1.0)])
        pc2 = load_prepared_corpus(cfg, [(prepared, 0.7), (str(root / "prepared-1b"), 0.3)])
        k = default_streams(t.batch_size, len(pc.sources[0].docs), prepared=True)  # a new run
        cases = [
            ("built-in text corpus in memory, 1 stream", text_corpus.train_docs, 1, 1),
            (f"prepared shards (mmap), {k} streams", pc.sources, k, 1),
            (f"prepared shards, {k} streams, one host of 4", pc.sources, k, 4),
            (f"mixture of 2 prepared sources, {k} streams", pc2.sources, k, 1),
        ]
        for name, sources, streams, hosts in cases:
            it = make_train_iterator(
                sources, d.seq_len, t.batch_size, d.seed, shard_count=hosts, streams=streams,
                prefetch=d.prefetch,
            )  # fmt: skip
            rate = _time_pipeline(it, batches, warmup)
            rows.append({"what": f"pipeline: {name}", "tokens/s": rate, "hosts": hosts})
        if train_tokens_per_s:
            train_rate, how = train_tokens_per_s, "given by --train-tokens-per-s"
        else:
            train_rate = bench_train(cfg, steps=train_steps)["tokens_per_sec"]
            how = f"{train_steps} timed steps of {t.batch_size}x{d.seq_len} tokens"
        rows.append({"what": "train step consumes", "tokens/s": train_rate, "note": how})
    for r in rows:
        if r["what"].startswith("pipeline"):
            # A host of n feeds 1/n of each global batch, so it must keep up with 1/n of the rate.
            need = train_rate / r["hosts"]
            r["note"] = f"{r['tokens/s'] / need:.0f}x what the train step needs from it"
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The results file: title, environment (taken now), table."""
    return report.markdown(title, environment(), report.table(COLUMNS, rows, right=("tokens/s",)))


# --- at scale: a synthetic source of any size ------------------------------------------------


def scale_sizes(documents: int) -> list[int]:
    """1e6, 1e8, 1e10, ... below `documents`, then `documents` itself."""
    sizes, n = [], 10**6
    while n < documents:
        sizes.append(n)
        n *= 100
    return [*sizes, documents]


def _reset_peak_rss() -> None:
    """Make this process's peak RSS its current RSS (Linux), so growth is measured from now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from the start
        pass


def _peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(
    n: int,
    workers: int,
    batch_size: int,
    seq_len: int,
    batches: int,
    warmup: int,
    seed: int,
    fraction: float,
    mean_tokens: int,
    vocab_size: int,
) -> dict[str, Any]:
    """One case, run in a fresh process: source, split, iterator, first batch, throughput."""
    _reset_peak_rss()
    before = _peak_rss_kib()
    t0 = time.perf_counter()
    docs = SyntheticDocs(n, mean_tokens, vocab_size, seed)
    train, _ = split_views(docs, fraction, seed)
    source = WeightedSource(train, 1.0, "synthetic", float(mean_tokens))
    streams = default_streams(batch_size, n, prepared=True)
    it = make_train_iterator(
        [source], seq_len, batch_size, seed, streams=streams, workers=workers
    )  # fmt: skip
    next(it)
    first = time.perf_counter() - t0
    try:
        rate = _time_pipeline(it, batches, warmup)
    finally:
        it.close()
    return {
        "documents": n,
        "workers": workers,
        "streams": streams,
        "first_batch_s": first,
        "rss_growth_mib": (_peak_rss_kib() - before) / 1024,
        "tokens/s": rate,
    }


def _child(conn: Any, kwargs: dict[str, Any]) -> None:
    try:
        conn.send(_measure(**kwargs))
    except Exception as e:  # sent back, so the parent names the case that failed
        conn.send(e)
    conn.close()


def _in_fresh_process(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Not a Pool: its processes are daemons, which may not start Grain's worker processes.
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, kwargs))
    proc.start()
    result = recv.recv()
    proc.join()
    if isinstance(result, Exception):
        raise result
    return result


def bench_scale(
    cfg: RunConfig,
    documents: int,
    *,
    batches: int = 50,
    warmup: int = 5,
    workers: tuple[int, ...] = (1, 2),
    mean_tokens: int = 256,
) -> list[dict[str, Any]]:
    """Rows of the pipeline over a synthetic source at each of scale_sizes(documents), in
    this process, and with each worker count at the largest size."""
    d = cfg.data
    base = dict(
        batch_size=cfg.train.batch_size, seq_len=d.seq_len, batches=batches, warmup=warmup,
        seed=d.seed, fraction=d.validation_fraction, mean_tokens=mean_tokens,
        vocab_size=cfg.model.vocab_size,
    )  # fmt: skip
    cases = [(n, 0) for n in scale_sizes(documents)] + [(documents, w) for w in workers if w > 0]
    return [_in_fresh_process({**base, "n": n, "workers": w}) for n, w in cases]


def scale_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The results file of bench_scale: title, environment (taken now), table."""
    body = report.table(SCALE_COLUMNS, rows, right=[c[0] for c in SCALE_COLUMNS])
    return report.markdown(title, environment(), body)
