"""MkDocs hook: writes the reference pages from the code at build time.

- reference/config.md: every config key, its default and meaning, parsed from what
  `jaxlm config --reference` prints (jaxlm.config.describe), so it is the schema itself.
- reference/cli.md: the `--help` of `jaxlm` and of every (sub)command, from the argparse parser.
- reference/api.md: the Python API of the public modules, rendered by mkdocstrings.
- the command table on the start page (index.md), from the same parser.

Nothing here is committed as Markdown, so a renamed key, a new flag or a changed docstring
shows up in the next build; tests/test_docs.py builds the site in strict mode.
"""

from __future__ import annotations

import argparse
import os
import re

from mkdocs.structure.files import File, Files

# Public modules, in reading order: (module, what it is for).
API_MODULES = [
    ("jaxlm.config", "load, override, validate and print run configs"),
    ("jaxlm.runs", "a run directory: its config, tokenizer and sharded parameters; export"),
    ("jaxlm.models", "build_model and the Flax modules"),
    ("jaxlm.train.step", "the pure, jitted train step"),
    ("jaxlm.train.loop", "the training loop behind `jaxlm train`"),
    ("jaxlm.inference.generate", "sampling with a KV cache or carried state"),
    ("jaxlm.inference.evaluate", "loss, perplexity, bits per byte, multiple choice"),
    ("jaxlm.data.tokenizer", "SentencePiece tokenizers"),
    ("jaxlm.data.prepare", "tokenize corpora into shards"),
    ("jaxlm.parallel.sharding", "the logical-axis rules table"),
    ("jaxlm.perf.flops", "FLOPs per token and MFU"),
    ("jaxlm.hf", "Hugging Face conversion"),
    ("jaxlm.paths", "local and object-store paths"),
    ("jaxlm.errors", "user-facing error types"),
]


SECTION = re.compile(r"^(\w+):  # (.*)$")
KEY = re.compile(r"^  (\w+): (.*?)  # (.*)$")


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped, and `*`, `_`, `<` shown as written, not as markup."""
    parts = text.split("`")  # odd parts are code spans: only their pipes need escaping
    return "`".join(
        p.replace("|", "\\|") if i % 2 else re.sub(r"([|*_<\\])", r"\\\1", p)
        for i, p in enumerate(parts)
    )


def config_reference() -> str:
    """Markdown tables of every config section, key, default and meaning."""
    from jaxlm.config import describe

    out = [
        "# Configuration keys",
        "",
        "Generated at build time from the config schema: this is what "
        "`jaxlm config --reference` prints. Set a key in a YAML file under its section, or "
        "on the command line as `section.key=value` (values are parsed as YAML). "
        "`[runtime]` model keys may differ from a checkpoint's when resuming or fine-tuning.",
    ]
    section, in_table = "", False
    for line in describe().splitlines():
        if m := SECTION.match(line):
            section, in_table = m[1], False
            out += ["", f"## `{section}`", "", _cell(m[2])]
        elif m := KEY.match(line):
            if not in_table:
                out += ["", "| key | default | meaning |", "|---|---|---|"]
                in_table = True
            default = m[2].replace("|", "\\|")
            out.append(f"| `{section}.{m[1]}` | `{default}` | {_cell(m[3])} |")
        else:  # a section docstring's further lines
            out.append(_cell(line.strip()))
    return "\n".join(out) + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """Every command's `--help`, one section per command, nested commands included."""
    from jaxlm.cli import build_parser

    out = [
        "# Command line",
        "",
        "Generated at build time from the argparse parsers: each block is exactly what "
        "`jaxlm COMMAND --help` prints.",
    ]

    def walk(name: str, parser: argparse.ArgumentParser, depth: int) -> None:
        out.extend(
            [
                "",
                f"{'#' * min(depth, 4)} `{name}`",
                "",
                "```text",
                parser.format_help().rstrip(),
                "```",
            ]
        )
        for child, sub in _subcommands(parser).items():
            walk(f"{name} {child}", sub, depth + 1)

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # the top-level help is sized from the terminal
    try:
        walk("jaxlm", build_parser(), 2)
    finally:
        if old is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(out) + "\n"


def command_table() -> str:
    """A table of every top-level command and its one-line help, linked to its reference."""
    from jaxlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = ["| command | what |", "|---|---|"]
    for action in sub._choices_actions:
        anchor = f"jaxlm-{action.dest}"
        rows.append(
            f"| [`jaxlm {action.dest}`](reference/cli.md#{anchor}) | {_cell(action.help)} |"
        )
    return "\n".join(rows)


def api_reference() -> str:
    """mkdocstrings directives for the public modules."""
    out = [
        "# Python API",
        "",
        "Generated at build time from the docstrings of jaxlm's public modules. "
        "The command line is a thin shell over these calls.",
        "",
    ]
    out += [f"- [`{mod}`](#{mod}): {what}" for mod, what in API_MODULES]
    for mod, _ in API_MODULES:
        out += ["", f"::: {mod}"]
    return "\n".join(out) + "\n"


PAGES = {
    "reference/config.md": config_reference,
    "reference/cli.md": cli_reference,
    "reference/api.md": api_reference,
}


COMMANDS_MARKER = "<!-- commands: docs/hooks.py fills in every command and its one-line help -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if COMMANDS_MARKER in markdown:
        return markdown.replace(COMMANDS_MARKER, command_table())
    return markdown


def on_files(files: Files, config) -> Files:
    for uri, render in PAGES.items():
        files.append(File.generated(config, uri, content=render()))
    return files
