"""Seeing inside a run: profiler traces of chosen steps, the step-time breakdown in every perf
record, and `jaxlm status` (sessions, restarts, recomputed steps, goodput) on a run that was
killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST_XLA, TINY_TRAIN, cli_error

from jaxlm import cli
from jaxlm.train.status import last_train_step, read_records, run_status


def test_profile_steps_write_a_trace_and_perf_records_carry_the_breakdown(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "-w", str(workdir), "--no-progress", *TINY_TRAIN, "train.steps=4"]
    assert cli.main([*argv, "train.profile_steps=[2, 3]", "train.log_every=2"]) == 0
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    perf = [r for r in read_records(workdir / "metrics.jsonl") if r["split"] == "perf"]
    assert [r["step"] for r in perf] == [2, 4]
    for r in perf:
        for phase in ("data", "dispatch", "device", "eval", "checkpoint"):
            assert r[f"{phase}_s"] >= 0.0
        assert 0.0 <= r["data_wait_fraction"] < 1.0
    assert "jaxlm" in (workdir / "config.yaml").read_text().splitlines()[0]  # the version line


@pytest.mark.parametrize(
    ("steps", "says"),
    [("[0, 3]", "1 <= first"), ("[3, 2]", "1 <= first"), ("[[1, 2], 5]", "pairs"), ("7", "list")],
)
def test_bad_profile_steps_are_refused_in_one_sentence(steps, says, capsys):
    err = cli_error(["config", f"train.profile_steps={steps}"], capsys)
    assert "train.profile_steps" in err and says in err


@pytest.mark.slow
def test_status_of_a_killed_and_resumed_run(tmp_path, capsys):
    # A run is SIGKILLed some steps after its checkpoint at step 20, then resumed to step
    # 30: status reports two sessions, one killed, the steps done twice, and a goodput.
    workdir = tmp_path / "run"
    over = [*TINY_TRAIN, "checkpoint.every_steps=20", "train.steps=30"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_XLA}
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", "-w", str(workdir), "--no-progress"]
    job = subprocess.Popen(
        [*cmd, *over, "train.steps=100000"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline:
        if (workdir / "checkpoints" / "20").is_dir():
            if last_train_step(workdir / "metrics.jsonl") >= 23:
                break
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    logged = last_train_step(workdir / "metrics.jsonl")
    assert cli.main([*cmd[3:], *over]) == 0

    status = run_status(workdir)
    assert status["step"] == 30 and status["checkpoints"] == [20, 30]
    assert (status["sessions"], status["restarts"], status["killed_sessions"]) == (2, 1, 1)
    assert status["recomputed_steps"] >= logged - 20 >= 3
    assert 0.0 < status["goodput"] < 1.0
    assert status["productive_s"] < status["wall_s"]
    capsys.readouterr()
    assert cli.main(["status", str(workdir)]) == 0
    text = capsys.readouterr().out
    assert "1 restarts, 1 killed" in text and "goodput" in text
    assert cli.main(["status", str(workdir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["restarts"] == 1


def test_status_of_a_directory_that_is_no_run(tmp_path, capsys):
    err = cli_error(["status", str(tmp_path)], capsys)
    assert str(tmp_path) in err and "config.yaml" in err


def test_version_names_the_package(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("jaxlm ")


def test_wandb_offline_run_holds_the_metrics(tmp_path, capsys):
    pytest.importorskip("wandb")
    workdir = tmp_path / "run"
    argv = ["train", "-w", str(workdir), "--no-progress", *TINY_TRAIN, "train.steps=2"]
    wandb_args = ["logging.wandb_project=jaxlm-test", "logging.wandb_mode=offline"]
    assert cli.main([*argv, *wandb_args]) == 0
    (run_file,) = (workdir / "wandb").glob("offline-run-*/run-*.wandb")
    logged = run_file.read_bytes()  # W&B's own record log: keys and JSON values as written
    loss = next(r["loss"] for r in read_records(workdir / "metrics.jsonl") if r["step"] == 2)
    assert b"train/loss" in logged and json.dumps(loss).encode() in logged
    assert b"jaxlm-test" in logged and b"model" in logged  # the project and the config
    # A restart continues the same W&B run.
    run_id = (workdir / "wandb_run_id").read_text().strip()
    assert cli.main([*argv, *wandb_args, "train.steps=3"]) == 0
    assert (workdir / "wandb_run_id").read_text().strip() == run_id
    assert len(list((workdir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_wandb_project_without_the_library_is_refused(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    err = cli_error(["config", "logging.wandb_project=p"], capsys)
    assert "jaxlm[wandb]" in err and "logging.wandb_project='p'" in err
