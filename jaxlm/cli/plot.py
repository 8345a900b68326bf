"""`jaxlm plot RUN_DIR... --output PNG`: loss curves of runs, overlaid."""

from __future__ import annotations

import argparse
import sys

from jaxlm.cli.common import formatter


def register(sub) -> None:
    p = sub.add_parser(
        "plot",
        formatter_class=formatter,
        help="draw train and eval loss of one or several runs as a PNG",
        description="Read each run's metrics.jsonl and draw train loss (lines) and eval loss "
        "(markers) against steps or tokens, all runs on one plot.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (jaxlm train)")
    p.add_argument("--output", "-o", default="loss.png", metavar="PNG", help="image to write")
    p.add_argument(
        "--x", choices=("steps", "tokens"), default="steps", metavar="AXIS", help="steps|tokens"
    )
    p.set_defaults(run=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxlm.bench.plot import plot_runs

    out = plot_runs(args.runs, args.output, args.x)
    print(f"jaxlm plot: wrote {out}", file=sys.stderr)
    return 0
