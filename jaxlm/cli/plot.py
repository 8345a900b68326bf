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
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="one run's step-time breakdown and goodput instead of loss curves",
    )
    p.add_argument(
        "--moe-load",
        action="store_true",
        help="one mixture-of-experts run's share of tokens per expert over steps (a heatmap)",
    )
    p.set_defaults(run=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxlm.bench.plot import plot_runs
    from jaxlm.config.files import check_output_file

    check_output_file(args.output, "--output")

    if args.moe_load:
        from jaxlm.bench.plot import plot_moe_load
        from jaxlm.errors import ConfigError

        if len(args.runs) != 1:
            raise ConfigError(f"--moe-load draws one run, not {len(args.runs)}; give one RUN_DIR.")
        out = plot_moe_load(args.runs[0], args.output)
    elif args.breakdown:
        from jaxlm.bench.plot import plot_breakdown
        from jaxlm.errors import ConfigError

        if len(args.runs) != 1:
            raise ConfigError(f"--breakdown draws one run, not {len(args.runs)}; give one RUN_DIR.")
        out = plot_breakdown(args.runs[0], args.output)
    else:
        out = plot_runs(args.runs, args.output, args.x)
    print(f"jaxlm plot: wrote {out}", file=sys.stderr)
    return 0
