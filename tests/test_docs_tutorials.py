"""Every command marked runnable in the tutorials runs, in order, at tiny sizes.

A fenced ```bash block right after a `<!-- runnable -->` line is a runnable block: each
command in it runs in a fresh directory that sees the repository's configs/ and jaxlm/.
`jaxlm train` gets the overrides below, which keep the commands and files of the tutorial
but shrink the model and the step count; everything else runs exactly as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = ["docs/tutorials/first-run.md", "docs/tutorials/your-data.md"]
MARKER = "<!-- runnable -->"

# A one-block, 32-wide model for 2 steps: the same config file, vocabulary and data.
TRAIN_OVERRIDES = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.steps=2",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=4",
    "optimizer.warmup_steps=1",
]


def runnable_commands(markdown: str) -> list[str]:
    """The commands of every fenced block marked runnable, continuation lines joined."""
    commands = []
    for block in re.findall(re.escape(MARKER) + r"\s*\n```bash[^\n]*\n(.*?)\n```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def tiny(command: str) -> str:
    if command.startswith("jaxlm train "):
        return command + " " + " ".join(TRAIN_OVERRIDES)
    return command


def test_runnable_blocks_are_found():
    for page in TUTORIALS:
        commands = runnable_commands((REPO / page).read_text())
        assert any(c.startswith("jaxlm ") for c in commands), f"{page}: no runnable jaxlm command"


@pytest.mark.parametrize("page", TUTORIALS)
def test_tutorial_commands_run(page, tmp_path):
    for name in ("configs", "jaxlm"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="100")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for command in runnable_commands((REPO / page).read_text()):
        done = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", tiny(command)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{page}: `{command}` failed:\n{done.stdout}\n{done.stderr}"
