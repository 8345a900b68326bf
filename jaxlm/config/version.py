"""Which jaxlm this is: the installed version and, in a git checkout, the commit."""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path


@functools.cache
def version_info() -> dict[str, str | None]:
    """{"version": the package version, "git": short commit (with "+dirty") or None}."""
    try:
        version = importlib.metadata.version("jaxlm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "git": _git_commit(Path(__file__).resolve().parent.parent)}


def _git_commit(directory: Path) -> str | None:
    """The checkout's commit, or None outside a git checkout (an installed wheel)."""
    try:
        run = functools.partial(
            subprocess.run, cwd=directory, capture_output=True, text=True, timeout=5
        )
        head = run(["git", "rev-parse", "--short=12", "HEAD"])
        if head.returncode != 0:
            return None
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def version_string() -> str:
    """`jaxlm 0.1.0 (git 0123abcd4567)`."""
    info = version_info()
    return f"jaxlm {info['version']}" + (f" (git {info['git']})" if info["git"] else "")


def version_header() -> str:
    """A YAML comment line recording the version, for files a run writes."""
    return f"# written by {version_string()}\n"
