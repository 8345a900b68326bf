"""The `jaxlm` command line: one entry point, one subcommand per job.

Each subcommand lives in a module of this package with `register(sub)`, which adds its
parser and sets `run` to its handler; COMMAND_MODULES lists them in help order. Only this
package reads process-wide state (argv, environment); everything below it takes explicit
arguments.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import sys

from jaxlm.cli.common import configure_logging, formatter
from jaxlm.config.version import version_string
from jaxlm.errors import ConfigError, UnwritablePathError

COMMAND_MODULES = [
    "jaxlm.cli.train",  # train, config, export
    "jaxlm.cli.evaluate",  # eval
    "jaxlm.cli.generate",
    "jaxlm.cli.chat",
    "jaxlm.cli.finetune",
    "jaxlm.cli.bench",
    "jaxlm.cli.plot",
    "jaxlm.cli.launch",
    "jaxlm.cli.plan",
    "jaxlm.cli.tokenizer",
    "jaxlm.cli.data",
    "jaxlm.cli.convert",  # convert from-hf, to-hf
    "jaxlm.cli.status",
]


class _CommandListFormatter(argparse.HelpFormatter):
    """The shared layout, with the help column wide enough for the longest command name."""

    # argparse sizes the column without the extra indent of subcommands, so a command name
    # over 8 characters (`tokenizer`) would push its help onto a second line.
    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        for subaction in self._iter_indented_subactions(action):
            width = len(self._format_action_invocation(subaction)) + self._current_indent
            self._action_max_length = max(self._action_max_length, width)


def _top_formatter(prog: str) -> argparse.HelpFormatter:
    return _CommandListFormatter(prog, max_help_position=30, width=110)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxlm",
        formatter_class=_top_formatter,
        description="Train, evaluate and sample JAX/Flax language models, from a laptop CPU "
        "to a multi-host pod.",
        epilog="Errors are one line; exit code 2 means a bad input, 1 a problem of the machine "
        "(an unwritable path, a full disk). Set JAXLM_DEBUG=1 to see the full traceback.",
    )
    parser.add_argument(
        "--version", action="version", version=version_string(), help="jaxlm's version and commit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = formatter
    return parser


def commands() -> list[str]:
    """Every top-level subcommand name."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def skip_absent_tpu(environ: dict[str, str] = os.environ) -> bool:
    """On a machine with libtpu installed (the test extra brings it) but no TPU attached,
    JAX's TPU probe prints a page of warnings at every start; when JAX_PLATFORMS is unset
    and nothing else could be an accelerator here, run on the CPU quietly. True if it did."""
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return False  # a TPU VM: let JAX find its chips
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return False  # maybe a GPU machine: keep JAX's own choice
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxlm` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    skip_absent_tpu()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ConfigError, OSError) as e:
        if os.environ.get("JAXLM_DEBUG", "0") not in ("", "0"):
            raise
        print(f"jaxlm {args.command}: error: {_sentence(e)}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print(f"jaxlm {args.command}: interrupted", file=sys.stderr)
        return 130


def exit_code(error: Exception) -> int:
    """2 for a bad input (config, arguments, a missing file); 1 for a problem of the machine,
    such as a path it can't write or a full disk."""
    if isinstance(error, UnwritablePathError):
        return 1
    return 2 if isinstance(error, (ConfigError, FileNotFoundError)) else 1


def _sentence(error: Exception) -> str:
    if isinstance(error, ConfigError) or not isinstance(error, OSError) or not error.strerror:
        return str(error)
    where = f"'{error.filename}'" if error.filename else "a file"
    return f"{error.strerror} at {where}; check the path, its permissions and the free space."
