"""Checksums of committed checkpoint steps, so flipped or truncated bytes are caught on restore.

Orbax stays the format; this only adds `checksums.json` inside each step directory: the size
and SHA-256 of every file Orbax wrote there. It is written after the step has committed (Orbax
never rewrites a committed step), so hashing reads finished files and never races the save,
and it travels with the step when a keep policy deletes it or a damaged step is moved aside.

A step without the file (written by an earlier jaxlm, or by a run killed between the commit
and the hashing) is restored unchecked, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jaxlm.errors import ConfigError

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 22


class DamagedCheckpoint(ConfigError):
    """A file of a committed step is missing or its bytes differ from those saved."""


def write_checksums(step_dir: Path) -> None:
    """Record the size and SHA-256 of every file under a committed step directory."""
    step_dir = Path(os.fspath(step_dir))  # a local directory (buckets keep their own checksums)
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        if rel != CHECKSUMS:
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=0, sort_keys=True), encoding="utf-8")
    os.replace(tmp, step_dir / CHECKSUMS)


def verify_checksums(step_dir: Path) -> bool:
    """True if every recorded file matches; False if the step has no record (unchecked).

    Raises DamagedCheckpoint naming the first file that is missing or differs.
    """
    step_dir = Path(os.fspath(step_dir))
    record_path = step_dir / CHECKSUMS
    if not record_path.is_file():
        return False
    try:
        files = json.loads(record_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{record_path} can't be read ({e})") from None
    for rel, want in files.items():
        path = step_dir / rel
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing")
        size = path.stat().st_size
        if size != want["size"] or _sha256(path) != want["sha256"]:
            raise DamagedCheckpoint(f"{path} does not match the checksum taken when it was saved")
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
