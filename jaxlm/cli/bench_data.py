"""`jaxlm bench data`: `data prepare` and pipeline tokens/s against the train step's."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jaxlm.cli.common import add_config_args, check_outputs, formatter
from jaxlm.config import load_config
from jaxlm.errors import ConfigError


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


def cmd_bench_data(args: argparse.Namespace) -> int:
    least_values = {"batches": 1, "warmup": 0, "train_steps": 0, "workers": 1, "copies": 1}
    for name, least in least_values.items():
        if (value := getattr(args, name)) < least:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be at least {least}.")
    check_outputs(args, "markdown")
    from jaxlm.bench import data as data_bench  # imports JAX: keep `--help` fast
    from jaxlm.bench import report

    cfg = load_config(args.config, args.overrides)
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
    if args.markdown:
        report.write_text(args.markdown, text)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0
