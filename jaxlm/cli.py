"""The `jaxlm` command line: one entry point, one subcommand per job.

Only this module reads process-wide state (argv, environment); everything below it takes
explicit arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm.config import ConfigError, describe, load_config

OVERRIDE_HELP = "config overrides, e.g. model.n_layers=4 train.steps=200"


def _formatter(prog: str) -> argparse.HelpFormatter:
    # Wide enough that every option's help stays on one line.
    return argparse.HelpFormatter(prog, max_help_position=30, width=110)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)"
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDE_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxlm",
        formatter_class=_formatter,
        description="Train, evaluate and sample JAX/Flax language models, from a laptop CPU "
        "to a multi-host pod.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model (resumes if the workdir has checkpoints)",
        description="Train a model described by a YAML config plus overrides. "
        "Everything the run writes goes into --workdir.",
    )
    _add_config_args(p)
    p.add_argument(
        "--workdir",
        "-w",
        required=True,
        metavar="DIR",
        help="run directory (config, tokenizer, metrics, checkpoints, samples)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="plain log lines instead of a progress bar",
    )

    p = sub.add_parser(
        "config",
        help="print the resolved config, or every key with its meaning",
        description="Resolve and validate a config without running anything.",
    )
    _add_config_args(p)
    p.add_argument(
        "--reference",
        action="store_true",
        help="list every key with its default and description instead",
    )

    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained run's latest checkpoint",
        description="Load the newest checkpoint of a run and sample text.",
    )
    p.add_argument("--workdir", "-w", required=True, metavar="DIR", help="a run directory")
    p.add_argument("--prompt", default="ROMEO.\n", metavar="TEXT", help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate"
    )
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 means greedy")
    p.add_argument(
        "--top-k", type=int, default=40, metavar="K", help="sample among the k likeliest (0: all)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    for subparser in sub.choices.values():
        subparser.formatter_class = _formatter
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from jaxlm.train.loop import train  # imports JAX: keep `--help` fast

    summary = train(cfg, args.workdir, progress=not args.no_progress)
    report = {k: v for k, v in summary.items() if k not in ("state", "samples", "eval_history")}
    print(json.dumps(report), file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(describe())
        return 0
    from jaxlm.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxlm.evaluate import load_run

    run = load_run(args.workdir)
    from jaxlm.generate import generate

    ids = run.tokenizer.encode(args.prompt, bos=True)
    out = generate(
        run.cfg.model,
        run.params,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_id=run.tokenizer.eos_id,
    )[0]
    print(args.prompt + run.tokenizer.decode(out))
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxlm` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
