"""`jaxlm bench data`: `data prepare` and pipeline tokens/s against the train step's."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jaxlm.cli.common import add_config_args, check_outputs, csv, formatter
from jaxlm.config import load_config
from jaxlm.errors import ConfigError


def register_bench(what) -> None:
    """`jaxlm bench data`."""
    d = what.add_parser(
        "data",
        formatter_class=formatter,
        help="data throughput: prepare and pipeline tokens/s vs the train step's consumption",
        description="Time `data prepare` and the input pipeline on the built-in corpus, and "
        "compare with the tokens/s the configured model's train step consumes. With "
        "--documents N: the pipeline over a synthetic source of 1e6, 1e8, ... N documents "
        "(host peak memory growth, time to first batch, tokens/s, with worker processes).",
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
    d.add_argument(
        "--documents",
        type=float,
        metavar="N",
        help="at scale: a synthetic source of up to N documents (e.g. 1e9) instead",
    )
    d.add_argument(
        "--pipeline-workers",
        type=csv(int),
        default=[1, 2],
        metavar="LIST",
        help="with --documents: worker process counts timed at N documents",
    )
    d.add_argument("--markdown", metavar="FILE", help="write the table as markdown")
    d.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    d.set_defaults(run=cmd_bench_data)


def cmd_bench_data(args: argparse.Namespace) -> int:
    least_values = {"batches": 1, "warmup": 0, "train_steps": 0, "workers": 1, "copies": 1}
    for name, least in least_values.items():
        if (value := getattr(args, name)) < least:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be at least {least}.")
    if args.documents is not None and not 1 <= args.documents <= 1e15:
        raise ConfigError(f"--documents {args.documents:g} must lie in [1, 1e15].")
    if any(w < 0 for w in args.pipeline_workers):
        raise ConfigError(f"--pipeline-workers {args.pipeline_workers} must all be >= 0.")
    check_outputs(args, "markdown", "json")
    from jaxlm.bench import data as data_bench  # imports JAX: keep `--help` fast
    from jaxlm.bench import report

    cfg = load_config(args.config, args.overrides)
    if args.documents is not None:
        return _scale(args, cfg, data_bench, report)
    rows = data_bench.bench_data(
        cfg,
        batches=args.batches,
        warmup=args.warmup,
        train_steps=args.train_steps,
        train_tokens_per_s=args.train_tokens_per_s,
        workers=args.workers,
        copies=args.copies,
    )
    title = f"Data throughput ({Path(args.config).name if args.config else 'default config'})"
    text = data_bench.markdown(rows, title)
    print(text, end="")
    _write(args, report, text, rows, data_bench.environment)
    return 0


def _scale(args: argparse.Namespace, cfg, data_bench, report) -> int:
    rows = data_bench.bench_scale(
        cfg,
        int(args.documents),
        batches=args.batches,
        warmup=args.warmup,
        workers=tuple(args.pipeline_workers),
    )
    name = Path(args.config).name if args.config else "default config"
    text = data_bench.scale_markdown(rows, f"Data pipeline at scale ({name})")
    print(text, end="")
    _write(args, report, text, rows, data_bench.environment)
    return 0


def _write(args: argparse.Namespace, report, text: str, rows: list, environment) -> None:
    if args.markdown:
        report.write_text(args.markdown, text)
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.json:
        report.write_results(args.json, rows, environment())
        print(f"wrote {args.json}", file=sys.stderr)
