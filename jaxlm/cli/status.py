"""`jaxlm status`: what a run directory says about its run, without touching a device."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "status",
        help="summarise a run from its workdir: progress, losses, speed, restarts, goodput",
        description="Read a run directory (metrics.jsonl, config.yaml, checkpoints) and report "
        "its step, tokens, losses, throughput, checkpoints, restarts, recomputed steps and "
        "goodput (the share of wall-clock time spent on steps that count).",
    )
    p.add_argument("workdir", metavar="RUN_DIR", help="a jaxlm run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from jaxlm.train.status import format_status, run_status

    status = run_status(args.workdir)
    print(json.dumps(status) if args.json else format_status(status))
    return 0
