"""The files a command reads and writes, checked before any work starts: text is read as
UTF-8 with an error naming the file and byte offset, and every output path is probed, so a
long job never ends in a write it can't make."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from jaxlm.errors import ConfigError, UnwritablePathError
from jaxlm.paths import as_path, check_reachable, is_remote


def decode_error(path: str | Path, e: UnicodeDecodeError) -> ConfigError:
    """The sentence for a file that is not UTF-8."""
    return ConfigError(
        f"'{path}' is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
        f"convert it to UTF-8 or leave it out."
    )


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file; other bytes raise ConfigError naming the file and offset."""
    data = as_path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None


def _probe(directory: Path, flag: str, path: str | Path) -> None:
    """Create and remove a file in `directory` (os.access trusts root, the disk may not)."""
    probe = directory / f".jaxlm-probe-{uuid.uuid4().hex}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as e:
        raise UnwritablePathError(
            f"{flag} '{path}' can't be written ({e.strerror or e} in '{directory}'); "
            f"choose a writable location or fix its permissions."
        ) from None


def check_output_dir(path: str | Path, flag: str) -> None:
    """Refuse a directory to write into unless it is one, or can be made where it is named."""
    if is_remote(path):
        as_path(path, flag)
        check_reachable(path, flag)  # a bucket has no permissions to probe; reach it instead
        return
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} '{path}' is a file, not a directory; name a directory.")
    _probe(_nearest_directory(p, flag, path), flag, path)


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse a file to write unless it can be created (or replaced) where it is named."""
    if is_remote(path):
        as_path(path, flag)
        check_reachable(path, flag)
        return
    p = Path(path).absolute()
    if p.is_dir():
        raise ConfigError(f"{flag} '{path}' is a directory; name a file to write.")
    _probe(_nearest_directory(p.parent, flag, path), flag, path)


def _nearest_directory(p: Path, flag: str, path: str | Path) -> Path:
    """`p` or its closest existing ancestor, which must be a directory (not a file)."""
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag} '{path}' lies under the file '{existing}'; name a path in a directory."
        )
    return existing
