"""jaxlm.train.lock: one run per workdir. A live holder refuses a second `jaxlm train` without
touching the first run's files, a dead one is taken over, and every way a run ends (done,
refused, diverged, stopped) gives the lock back."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, assert_one_sentence, cli_error

from jaxlm import cli
from jaxlm.errors import ConfigError
from jaxlm.train.lock import LOCK_NAME, WorkdirLock

TINY = TINY_TRAIN


def _dead_pid() -> int:
    """The pid of a process that has just exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir: Path, **record) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


# --- the lock itself --------------------------------------------------------------------------


def test_second_holder_is_refused_naming_the_first(tmp_path):
    first, second = WorkdirLock(tmp_path / "run"), WorkdirLock(tmp_path / "run")
    first.acquire()
    record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    with pytest.raises(ConfigError) as e:
        second.acquire()
    message = str(e.value)
    assert_one_sentence(message)
    assert f"pid {os.getpid()}" in message and record["started"] in message
    assert socket.gethostname() in message and str(tmp_path / "run" / LOCK_NAME) in message
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    second.acquire()  # free again
    second.release()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    path = _write_lock(
        tmp_path / "run", host=socket.gethostname(), pid=dead, started="2026-01-01T00:00:00"
    )
    lock = WorkdirLock(tmp_path / "run")
    lock_logger = logging.getLogger("jaxlm.train.lock")
    lock_logger.addHandler(caplog.handler)  # the CLI's logging set-up may stop propagation
    try:
        with caplog.at_level(logging.WARNING, logger="jaxlm.train.lock"):
            lock.acquire()
    finally:
        lock_logger.removeHandler(caplog.handler)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    (warning,) = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert f"pid {dead}" in warning and "no longer alive" in warning
    assert {p.name for p in (tmp_path / "run").iterdir()} == {LOCK_NAME}  # no debris left
    lock.release()


@pytest.mark.parametrize(
    "record",
    [
        {"host": "another-host", "pid": 1, "started": "2026-01-01T00:00:00"},  # can't be checked
        {"host": None, "pid": None},  # unreadable fields
    ],
)
def test_holder_that_cannot_be_checked_is_refused(tmp_path, record):
    _write_lock(tmp_path / "run", **record)
    with pytest.raises(ConfigError, match="is in use by a jaxlm run"):
        WorkdirLock(tmp_path / "run").acquire()


def test_unparsable_lock_is_refused_and_kept(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("{torn")
    with pytest.raises(ConfigError, match=r"can't be read; delete it"):
        WorkdirLock(tmp_path).acquire()
    assert path.read_text() == "{torn"


def test_created_workdir_is_removed_when_it_stays_empty(tmp_path):
    lock = WorkdirLock(tmp_path / "a" / "b" / "run")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "a").exists()
    lock = WorkdirLock(tmp_path / "kept")
    lock.acquire()
    (tmp_path / "kept" / "config.yaml").write_text("x")
    lock.release()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["config.yaml"]


def test_workdir_under_a_file_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("")
    for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ConfigError, match="is a file or lies under one") as e:
            WorkdirLock(workdir).acquire()
        assert_one_sentence(str(e.value))


# --- real runs --------------------------------------------------------------------------------


def _wait_stopped(pid: int) -> None:
    """Wait until SIGSTOP has taken effect: kill() returns before the target stops, and a
    save thread could still finish a write between the two snapshots (seen once in a full run)."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "Tt":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.01)
    time.sleep(0.2)  # and let I/O already handed to the kernel land


def test_second_train_on_a_live_workdir_is_refused_and_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", "-w", str(workdir), "--no-progress"]
    extra = ["train.steps=100000", "checkpoint.every_steps=2", "checkpoint.agree_every=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([*cmd, *TINY, *extra], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "checkpoints" / "4").is_dir():  # committed saves and metrics
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never saved step 4"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGSTOP)  # alive, but its files hold still while we look
        _wait_stopped(first.pid)
        before = _snapshot(workdir)
        err = cli_error(
            ["train", "-w", str(workdir), "--no-progress", *TINY, "train.steps=6"], capsys
        )
        assert f"pid {first.pid}" in err and socket.gethostname() in err, err
        assert_one_sentence(err.removeprefix("jaxlm train: error: "))
        assert _snapshot(workdir) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.send_signal(signal.SIGTERM)  # saves at the next step and exits cleanly
        rc = first.wait(timeout=120)
    assert rc == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert not (workdir / LOCK_NAME).exists()


def _snapshot(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def test_every_ending_gives_the_lock_back(tmp_path, capsys):
    # Refused during set-up (after the lock was taken): a new workdir is not left behind.
    err = cli_error(["train", "-w", str(tmp_path / "new"), *TINY, "mesh.data=4"], capsys)
    assert "data=4" in err and not (tmp_path / "new").exists()

    # Diverged under nan_policy=skip: stopped after max_skipped_steps skips in a row.
    workdir = tmp_path / "run"
    diverge = ["optimizer.lr=1e6", "optimizer.grad_clip=0", "optimizer.weight_decay=0"]
    skip = ["train.nan_policy=skip", "train.max_skipped_steps=3", "train.steps=60"]
    argv = ["train", "-w", str(workdir), "--no-progress", *TINY, *diverge, *skip]
    capsys.readouterr()
    assert cli.main([*argv, "checkpoint.every_steps=0"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    match = re.search(r"Steps (\d+) to (\d+) all had a non-finite", last)
    assert match and int(match.group(2)) - int(match.group(1)) == 2, last
    assert "train.max_skipped_steps=3" in last
    assert_one_sentence(last.removeprefix("jaxlm train: error: "))
    assert not (workdir / LOCK_NAME).exists()
