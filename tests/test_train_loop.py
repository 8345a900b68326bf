"""The training loop (jaxlm.train.loop) under real `jaxlm train` processes killed, preempted,
damaged and diverging.

The bar: a run killed at any moment and started again with the same command ends with
bitwise the parameters and per-step losses of a run that was never interrupted. Each case
is one or a few subprocesses of a tiny model; a shared persistent compilation cache keeps
the repeated starts cheap (a restarted run that traced a different program would miss it
and be caught by the bitwise comparison all the same).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_MODEL

from jaxlm.config import load_config
from jaxlm.runs import abstract_params
from jaxlm.train.checkpoint import Checkpointer

STEPS = 40
TINY = [
    *TINY_MODEL,
    "train.batch_size=4",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optimizer.warmup_steps=2",
    "checkpoint.every_steps=7",
    "checkpoint.keep=2",
    "checkpoint.keep_every=14",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """One CPU device and a compilation cache shared by every run of this module."""
    out = dict(os.environ)
    out["XLA_FLAGS"] = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", out.get("XLA_FLAGS", "")
    )
    out.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return out


def _start(workdir: Path, env: dict[str, str], *extra: str, log: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", "-w", str(workdir), "--no-progress"]
    with open(workdir.parent / f"{workdir.name}{log}.log", "ab") as out:
        return subprocess.Popen([*cmd, *TINY, *extra], env=env, stdout=out, stderr=out)


def _log_text(workdir: Path, log: str = "") -> str:
    return (workdir.parent / f"{workdir.name}{log}.log").read_text(errors="replace")


def _run(workdir: Path, env: dict[str, str], *extra: str, expect: int = 0) -> str:
    """Run to the end; returns the stderr of this run."""
    before = len(_log_text(workdir)) if (workdir.parent / f"{workdir.name}.log").exists() else 0
    rc = _start(workdir, env, *extra).wait(timeout=300)
    out = _log_text(workdir)[before:]
    assert rc == expect, out[-3000:]
    return out


def _records(workdir: Path, split: str = "train") -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for ln in lines:
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return [r for r in rows if r["split"] == split]


def _wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in _records(workdir)):
            return
        assert proc.poll() is None, f"run ended before step {step}:\n{_log_text(workdir)[-3000:]}"
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _losses(workdir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad norm); fails on a step logged twice."""
    rows = _records(workdir)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def _state(workdir: Path, step: int | None = None):
    """A checkpoint's full train state as numpy (the newest one by default)."""
    cfg = load_config(workdir / "config.yaml")
    abstract, _ = abstract_params(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint, read_only=True)
    try:
        return jax.device_get(ckpt.restore(step or ckpt.latest_step(), abstract))
    finally:
        ckpt.close()


def _assert_bitwise_equal(a, b) -> None:
    flat_a, tree_a = jax.tree.flatten_with_path(a)
    flat_b, tree_b = jax.tree.flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, env) -> Path:
    """The uninterrupted run every other case must reproduce."""
    workdir = tmp_path_factory.mktemp("baseline") / "run"
    workdir.mkdir()
    _run(workdir, env)
    assert sorted(_losses(workdir)) == list(range(1, STEPS + 1))
    return workdir


def test_uninterrupted_run_keeps_latest_and_every_k(baseline):
    # keep=2 newest, plus every multiple of keep_every=14 among the saves (every 7 steps).
    assert _steps(baseline) == [14, 28, 35, 40]


@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(baseline, env, tmp_path, seed):
    rng = random.Random(seed)
    workdir = tmp_path / "run"
    workdir.mkdir()
    for kill_at in sorted(rng.sample(range(3, STEPS - 8), 2)):
        proc = _start(workdir, env)
        _wait_for_step(proc, workdir, kill_at)
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere in the step, save or log write
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before the kill"
    _run(workdir, env)
    assert _losses(workdir) == _losses(baseline)
    _assert_bitwise_equal(_state(workdir), _state(baseline))


def test_sigterm_saves_at_the_current_step_exits_zero_and_resumes(baseline, env, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = _start(workdir, env)
    _wait_for_step(proc, workdir, 9)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, _log_text(workdir)[-3000:]
    summary = [ln for ln in _log_text(workdir).splitlines() if ln.startswith("{")][-1]
    stopped = json.loads(summary)["stopped_at"]
    assert stopped is not None and 9 <= stopped < STEPS
    assert max(_losses(workdir)) == stopped  # every step up to the stop is logged
    assert max(_steps(workdir)) == stopped
    assert not (workdir / "samples.txt").exists()

    err = _run(workdir, env)
    assert f"Resumed from checkpoint step {stopped}" in err
    assert _losses(workdir) == _losses(baseline)
    _assert_bitwise_equal(_state(workdir), _state(baseline))


def test_damaged_latest_checkpoint_is_skipped_kept_and_replaced(baseline, env, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    step_dir = workdir / "checkpoints" / str(STEPS)
    victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)

    err = _run(workdir, env)
    assert f"Checkpoint step {STEPS}" in err and "unreadable" in err
    assert "Resumed from checkpoint step 35" in err
    # Nothing deleted: the damaged step, truncated file and all, sits in checkpoints.damaged.
    (parked,) = (workdir / "checkpoints.damaged").iterdir()
    assert parked.name.startswith(f"{STEPS}-")
    assert (parked / victim.relative_to(step_dir)).stat().st_size == size // 2
    assert _steps(workdir) == [14, 28, 35, 40]
    assert _losses(workdir) == _losses(baseline)
    _assert_bitwise_equal(_state(workdir), _state(baseline))


def test_divergence_stops_naming_the_step_and_never_saves_nonfinite(env, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # A learning rate that kills the model within a few checkpoints (measured: NaN at 16).
    diverge = ["optimizer.lr=1e5", "optimizer.warmup_steps=30", "optimizer.weight_decay=0"]
    err = _run(workdir, env, *diverge, "optimizer.grad_clip=0", expect=1)
    last = err.strip().splitlines()[-1]
    match = re.search(r"^jaxlm train: error: .* at step (\d+)", last)
    assert match, last
    bad_step = int(match.group(1))
    assert _records(workdir)[-1]["step"] == bad_step
    saved = _steps(workdir)
    assert saved and max(saved) < bad_step, saved  # checkpoints exist, none after the NaN
    for step in saved:
        state = _state(workdir, step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")


def _summary(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow  # ~100 s here: six process starts on two busy cores
def test_two_processes_agree_on_sigterm_fail_fast_on_sigkill_and_resume(env, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def start(i: int) -> subprocess.Popen:
        # Agree at every step, so the stop lands right after the signal (the default, every
        # 10 steps, has its own test in test_train_guard.py).
        flags = ["checkpoint.agree_every=1", "--coordinator", f"127.0.0.1:{port}"]
        flags += ["--num-processes", "2", "--process-id", str(i)]
        return _start(workdir, env, *flags, log=f".p{i}")

    def log(i: int, since: int = 0) -> str:
        return _log_text(workdir, f".p{i}")[since:]

    # SIGTERM reaches only process 1; both stop, at the same step, with one checkpoint.
    procs = [start(0), start(1)]
    _wait_for_step(procs[0], workdir, 5)
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [0, 0], log(0)[-3000:]
    # Only process 0 reports; process 1 stopped at that same step, or process 0 would have
    # waited for it in the next collective instead of exiting.
    assert not any(ln.startswith("{") for ln in log(1).splitlines())
    assert max(_steps(workdir)) == _summary(log(0))["stopped_at"]

    # SIGKILL of process 1: process 0 fails in its next collective and says so, quickly.
    procs = [start(0), start(1)]
    _wait_for_step(procs[0], workdir, 17)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert procs[1].wait(timeout=60) == -signal.SIGKILL
    assert procs[0].wait(timeout=90) == 3, log(0)[-3000:]
    assert time.monotonic() - killed < 60
    err = log(0).strip().splitlines()[-1]
    assert err.startswith("jaxlm train: error: process 0 of 2") and "another process" in err
    before = _losses(workdir)  # includes steps after the last checkpoint, to be redone

    # The same command resumes both from the last committed checkpoint.
    marks = [len(log(0)), len(log(1))]
    procs = [start(0), start(1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], log(0)[-3000:]
    assert _summary(log(0, marks[0]))["start_step"] in (7, 14)  # 14 unless cut off
    after = _losses(workdir)
    assert sorted(after) == list(range(1, STEPS + 1))
    assert {s: after[s] for s in before} == before  # redone steps are bitwise the same
