"""One training run per workdir: a lock file naming its holder, held for the life of the run.

The lock is `<workdir>/train.lock`, a small JSON record (host, pid, start time) that appears
atomically: it is written under a private name and hard-linked into place, so a reader never
sees a half-written record and two runs can't both create it. A lock whose holder is a dead
process on this host is stale and taken over with a warning; a holder on another host can't
be checked from here, so only the user can declare it gone (by deleting the file).

In a bucket (gs://, s3://) there are no hard links: the record is created only if no lock
object exists and read back to confirm, which guards against the usual mistake (a second run
started on a busy workdir) though not against two starts in the same instant.
`hold_workdir` is what the training loop uses: with several processes only process 0 takes the lock and the others
learn its outcome through a collective, so a refusal ends every process instead of leaving
some waiting for the others.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.errors import ConfigError
from jaxlm.paths import Path, as_path, is_remote

logger = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
_TAKEOVER_WAIT_S = 10.0  # a takeover holds its guard for microseconds; older guards are debris


class WorkdirLock:
    """The lock file of one workdir; `acquire` creates the workdir if needed, `release`
    removes the lock and any directories `acquire` created that are still empty."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = as_path(workdir, "--workdir")
        self.path = self.workdir / LOCK_NAME
        self.held = False
        self._created: list[Path] = []  # directories made by acquire, deepest last

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the live run that holds it."""
        self._make_workdir()
        try:
            for _ in range(3):  # a lost race with another takeover just tries again
                if _link_record(self.path, _own_record()):
                    self.held = True
                    return
                holder = _read(self.path)
                if holder is None:
                    continue  # released between our attempt and the read
                if not holder:
                    raise ConfigError(
                        f"The lock {self.path} can't be read; delete it if no other jaxlm train "
                        f"uses {self.workdir}, then start again."
                    )
                if _alive(holder):
                    raise ConfigError(
                        f"The workdir {self.workdir} is in use by a jaxlm run on host "
                        f"{holder.get('host')} (pid {holder.get('pid')}, started "
                        f"{holder.get('started')}); wait for it to end or stop it, use another "
                        f"--workdir, or delete {self.path} if that run is surely gone."
                    )
                self._take_over(holder)
            raise ConfigError(
                f"The lock {self.path} kept changing hands while this run tried to take it; "
                f"make sure only one jaxlm train uses {self.workdir}, then start it again."
            )
        except PermissionError:
            self._remove_created()
            raise ConfigError(
                f"--workdir {self.workdir} is not writable (permission denied); choose a "
                f"writable location or fix its permissions."
            ) from None
        except BaseException:
            self._remove_created()
            raise

    def release(self) -> None:
        """Give the lock back (if held) and remove directories acquire made that stayed empty."""
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._remove_created()

    def _make_workdir(self) -> None:
        if is_remote(self.workdir):
            return  # a bucket has no directories to make
        missing, p = [], self.workdir.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(
                f"--workdir {self.workdir} is a file or lies under one; give a directory path."
            ) from None
        except PermissionError:
            raise ConfigError(
                f"--workdir {self.workdir} can't be created (permission denied); choose a "
                f"writable location."
            ) from None
        self._created = list(reversed(missing))

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Replace a dead holder's lock, under a guard so two newcomers can't both do it."""
        guard = self.path.with_name(self.path.name + ".takeover")
        deadline = time.monotonic() + _TAKEOVER_WAIT_S
        while not _link_record(guard, _own_record()):
            if time.monotonic() > deadline:  # left by a process that died mid-takeover
                with contextlib.suppress(FileNotFoundError):
                    guard.unlink()
            time.sleep(0.05)
        try:
            if _read(self.path) == stale:  # still the dead holder's, not a newcomer's
                self.path.unlink()
                logger.warning(
                    "Took over the lock %s of a run that is no longer alive (host %s, pid %s, "
                    "started %s).",
                    self.path,
                    stale.get("host"),
                    stale.get("pid"),
                    stale.get("started"),
                )
        finally:
            guard.unlink()

    def _remove_created(self) -> None:
        for d in reversed(self._created):  # deepest first; a directory with files stays
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created = []


@contextlib.contextmanager
def hold_workdir(workdir: Path) -> Iterator[None]:
    """Hold `workdir`'s lock while the body runs (process 0 takes it for every process)."""
    lock = WorkdirLock(workdir)
    error: BaseException | None = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except BaseException as e:  # the other processes must hear of it, or they wait forever
            error = e
    if jax.process_count() > 1:
        taken = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not taken and error is None:
            raise ConfigError(
                f"Process 0 could not lock the workdir {workdir} (its own error says why); fix "
                f"that and start every process again."
            )
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


def _own_record() -> dict[str, Any]:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def _link_record(path: Path, record: dict[str, Any]) -> bool:
    """Create `path` holding `record`, atomically; False if it already exists."""
    if is_remote(path):
        return _put_record(path, record)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)  # fails if `path` exists, and never shows a partial file
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return True
    finally:
        tmp.unlink()


def _put_record(path: Path, record: dict[str, Any]) -> bool:
    """The object-store version: create unless present, then read back who holds it."""
    if path.exists():
        return False
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return _read(path) == record


def _read(path: Path) -> dict[str, Any] | None:
    """The record in a lock file; None if there is none; {} if it can't be parsed."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive(holder: dict[str, Any]) -> bool:
    """False only when the holder is surely gone: a pid on this host that no longer runs."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True  # another host's process (or an unreadable record) can't be checked here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
