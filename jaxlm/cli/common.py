"""Argument helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

from jaxlm.config.files import check_output_file

OVERRIDE_HELP = "config overrides, e.g. model.n_layers=4 train.steps=200"


def formatter(prog: str) -> argparse.HelpFormatter:
    # Wide enough that every option's help stays on one line.
    return argparse.HelpFormatter(prog, max_help_position=30, width=110)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)"
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDE_HELP)


def csv(kind):
    """argparse type: a comma-separated list of `kind` values."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind is bool:
            table = {"true": True, "false": False}
            if any(t.lower() not in table for t in items):
                raise argparse.ArgumentTypeError(f"{text!r} is not a list of true/false")
            return [table[t.lower()] for t in items]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of {kind.__name__}") from None

    return parse


def check_outputs(args: argparse.Namespace, *names: str) -> None:
    """Probe the output files named by these options before a benchmark runs for minutes."""
    for name in names:
        if getattr(args, name, None):
            check_output_file(getattr(args, name), "--" + name.replace("_", "-"))


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """Multi-process flags; without them jaxlm.parallel.distributed reads the scheduler's environment."""
    p.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0 (multi-process runs)"
    )
    p.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    p.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")


class _TqdmHandler(logging.Handler):
    """Log records to the current stderr through tqdm, so an open progress bar stays intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging() -> None:
    """jaxlm's library modules log through `logging`; show their INFO lines as plain text."""
    logger = logging.getLogger("jaxlm")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # other libraries may give the root logger a handler of its own


def quiet_other_processes(process_index: int) -> None:
    """In a multi-process run only process 0 reports progress; the others only warnings."""
    logging.getLogger("jaxlm").setLevel(logging.INFO if process_index == 0 else logging.WARNING)
