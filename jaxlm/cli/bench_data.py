"""`jaxlm bench data`: corpus preparation and pipeline throughput against what training eats.

Rows measured on the built-in Shakespeare corpus:
  prepare (N workers)     tokens/s tokenized and written by `jaxlm data prepare`
  pipeline: <source>      tokens/s of packed batches one process produces, after warm-up
  train step              tokens/s the configured model consumes (timed real train steps)
The pipeline rows also give their ratio to the train step (the issue asks for >= 10x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxlm.cli.common import add_config_args, formatter


def register_bench(what) -> None:
    """`jaxlm bench data`."""
    d = what.add_parser(
        "data",
        formatter_class=formatter,
        help="data throughput: prepare and pipeline tokens/s vs the train step's consumption",
        description="Time `data prepare` and the input pipeline on the built-in corpus, and "
        "compare with the tokens/s the configured model's train step consumes.",
    )
    add_config_args(d)
    d.add_argument("--batches", type=int, default=200, metavar="N", help="timed pipeline batches")
    d.add_argument("--warmup", type=int, default=20, metavar="N", help="untimed batches first")
    d.add_argument("--train-steps", type=int, default=10, metavar="N", help="timed train steps")
    d.add_argument(
        "--train-tokens-per-s",
        type=float,
        metavar="X",
        help="use this train consumption instead of timing train steps",
    )
    d.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, metavar="N", help="prepare processes"
    )
    d.add_argument(
        "--copies", type=int, default=3, metavar="N", help="prepare N copies of the corpus"
    )
    d.add_argument("--markdown", metavar="FILE", help="write the table as markdown")
    d.set_defaults(run=cmd_bench_data)


def _env() -> dict[str, Any]:
    """bench train's environment plus the data libraries' versions and the machine's load."""
    import grain
    import numpy as np
    import sentencepiece

    from jaxlm.bench.train import environment

    return {
        **environment(),
        # Other work on the machine slows the train step more than the pipeline: say how much.
        "load average (1 min)": round(os.getloadavg()[0], 1),
        "grain": getattr(grain, "__version__", "?"),
        "numpy": np.__version__,
        "sentencepiece": sentencepiece.__version__,
    }


def _time_pipeline(it, batches: int, warmup: int) -> float:
    """Tokens per second of an iterator of batches, after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["inputs"].size
    return tokens / (time.perf_counter() - t0)


def cmd_bench_data(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config
    from jaxlm.data import corpus
    from jaxlm.data.mixture import load_prepared_corpus
    from jaxlm.data.prepare import prepare
    from jaxlm.data.tokenizer import train_tokenizer

    cfg = load_config(args.config, args.overrides)
    d, t = cfg.data, cfg.train
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="jaxlm-bench-data-") as tmp:
        root = Path(tmp)
        works = corpus.load_builtin_works()
        # The same documents the in-memory path trains on, one JSONL file per work, so the
        # prepared rows compare like with like.
        text_dir = root / "text"
        text_dir.mkdir()
        for w in works:
            docs = corpus.split_documents(w.text, d.doc_chars)
            lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
            for copy in range(args.copies):  # enough text that process start-up is amortised
                (text_dir / f"{w.name}-{copy}.jsonl").write_text(lines, encoding="utf-8")
        tok = train_tokenizer((w.text for w in works), str(root / "tok.model"), d_vocab(cfg))
        total_bytes = args.copies * sum(len(w.text.encode("utf-8")) for w in works)
        for workers in sorted({1, max(1, args.workers)}):
            out = root / f"prepared-{workers}"
            t0 = time.perf_counter()
            man = prepare(
                [str(text_dir / "*.jsonl")], tok.path, out,
                workers=workers, shard_bytes=total_bytes // 8 + 1, progress=False,
                log=lambda m: None,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "what": f"data prepare, {workers} worker(s)",
                    "tokens/s": man["tokens"] / seconds,
                    "note": f"{man['tokens']:,} tokens, {total_bytes / 1e6:.1f} MB in {seconds:.2f} s",
                }
            )
        prepared = str(root / "prepared-1")
        # A second copy under another name, as the second source of a mixture.
        shutil.copytree(prepared, root / "prepared-1b")
        cfg = _with(cfg, tokenizer=tok.path)

        from jaxlm.data.dataset import prepare_corpus
        from jaxlm.data.pipeline import make_train_iterator

        text_corpus = prepare_corpus(cfg, root / "run")
        pc = load_prepared_corpus(cfg, [(prepared, 1.0)])
        pc2 = load_prepared_corpus(cfg, [(prepared, 0.7), (str(root / "prepared-1b"), 0.3)])
        k = math.gcd(t.batch_size, 8)
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
            rate = _time_pipeline(it, args.batches, args.warmup)
            rows.append({"what": f"pipeline: {name}", "tokens/s": rate, "hosts": hosts})
        if args.train_tokens_per_s:
            train_rate, how = args.train_tokens_per_s, "given by --train-tokens-per-s"
        else:
            from jaxlm.bench.train import bench_train

            train_rate = bench_train(cfg, steps=args.train_steps)["tokens_per_sec"]
            how = f"{args.train_steps} timed steps of {t.batch_size}x{d.seq_len} tokens"
        rows.append({"what": "train step consumes", "tokens/s": train_rate, "note": how})
    for r in rows:
        if r["what"].startswith("pipeline"):
            # A host of n feeds 1/n of each global batch, so it must keep up with 1/n of the rate.
            need = train_rate / r["hosts"]
            r["note"] = f"{r['tokens/s'] / need:.0f}x what the train step needs from it"
    env = _env()
    title = f"Data throughput ({Path(args.config).name if args.config else 'default config'})"
    text = _markdown(rows, env, title)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text, encoding="utf-8")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


def d_vocab(cfg) -> int:
    """The vocabulary size the benchmark's tokenizer is trained to (the model's)."""
    return cfg.model.vocab_size


def _with(cfg, **data):
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def _markdown(rows: list[dict[str, Any]], env: dict[str, Any], title: str) -> str:
    facts = ", ".join(f"{k}: {v}" for k, v in env.items())
    lines = [f"# {title}", "", facts, "", "| what | tokens/s | note |", "|---|---:|---|"]
    lines += [f"| {r['what']} | {r['tokens/s']:,.0f} | {r['note']} |" for r in rows]
    return "\n".join(lines) + "\n"
