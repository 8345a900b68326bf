"""jaxlm.parallel.distributed, the multi-host path for real: several processes on 127.0.0.1
joined by jax.distributed.

One run goes through the entry point users run (`jaxlm launch local`, which starts
`jaxlm train --coordinator ...` per process) and must match a one-process run on the same
number of devices. Lighter probes check that SLURM's and the JobSet manifest's variables
are enough for processes to find each other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_XLA, TINY_HOSTS, assert_one_sentence, free_port

from jaxlm.errors import ConfigError
from jaxlm.parallel.distributed import jax_cluster, resolve_layout

# A one-block model, 3 steps, one eval batch, 8 sampled tokens: the work is start-up.
OVERRIDES = [
    *TINY_HOSTS,
    "model.n_kv_heads=2",
    "train.sample_tokens=8",  # the samples decode on parameters sharded over both hosts
    "checkpoint.every_steps=2",
    # 2 x 2 devices: fsdp across the two processes, tensor inside each.
    "mesh.data=1",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_XLA, **extra}


def _train_losses(workdir: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train" and "loss" in r]
    evals = [r["loss"] for r in records if r["split"] == "eval"]
    return train, evals


def _one_and_two_processes(root: Path, overrides: list[str]) -> dict:
    """The same tiny run on 1 process x 4 devices and on 2 processes x 2 devices."""
    one, two = root / "one", root / "two"
    cli = [sys.executable, "-m", "jaxlm.cli"]
    four = f"{FAST_XLA} --xla_force_host_platform_device_count=4"
    single = subprocess.run(
        cli + ["train", "--workdir", str(one), "--no-progress", *overrides],
        env=_env(XLA_FLAGS=four),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    multi = subprocess.run(
        cli
        + ["launch", "local", "--workdir", str(two), "--nodes", "2", "--cpu-devices", "2"]
        + ["--port", str(free_port()), *overrides],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-4000:]
    return {"one": one, "two": two, "log": multi.stderr, "stdout": multi.stdout}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return _one_and_two_processes(tmp_path_factory.mktemp("multihost"), OVERRIDES)


def test_two_processes_match_one_process(runs):
    train_one, eval_one = _train_losses(runs["one"])
    train_two, eval_two = _train_losses(runs["two"])
    assert len(train_one) == 3 and len(eval_one) >= 1
    np.testing.assert_allclose(train_two, train_one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(eval_two, eval_one, rtol=0, atol=1e-5)


def test_two_processes_really_ran_as_one_job(runs):
    log = runs["log"]
    assert "4 device(s)" in log  # each process sees the 4 global devices
    assert log.count("jaxlm: llama model") == 1  # only process 0 logs


def test_two_processes_write_the_samples_of_one_process(runs):
    # Decoding runs on the parameters where they lie (fsdp across the two hosts): the same
    # greedy and sampled text as one process, printed once.
    samples = (runs["two"] / "samples.txt").read_text()
    assert samples == (runs["one"] / "samples.txt").read_text()
    assert samples.count("--- greedy") == 1 and runs["stdout"].count("--- greedy") == 1


def test_multi_process_checkpoints_are_written_once(runs):
    steps = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2", "3"]
    assert (runs["two"] / "config.yaml").is_file()


# Context parallelism across hosts: the sequence axis spans the two processes, so both hold
# every row (each its half of the sequence) and load the same rows.
ACROSS = [o for o in OVERRIDES if not o.startswith("mesh.")]
ACROSS += ["mesh.data=1", "mesh.fsdp=1", "mesh.sequence=4", "model.context_parallel=ring"]
ACROSS += ["model.attention=pallas"]


def test_context_parallelism_across_processes_matches_one_process(tmp_path):
    runs = _one_and_two_processes(tmp_path, ACROSS)
    train_one, eval_one = _train_losses(runs["one"])
    train_two, eval_two = _train_losses(runs["two"])
    assert len(train_one) == 3 and len(eval_one) >= 1
    np.testing.assert_allclose(train_two, train_one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(eval_two, eval_one, rtol=0, atol=1e-5)
    assert (runs["two"] / "samples.txt").read_text() == (runs["one"] / "samples.txt").read_text()
    # Both processes loaded the one block of rows, so they saved the same data position.
    saved = sorted((runs["two"] / "checkpoints" / "3" / "data_iter").glob("process_*.json"))
    assert len(saved) == 2 and saved[0].read_text() == saved[1].read_text()


def test_processes_sharing_rows_unevenly_are_refused_in_one_sentence(tmp_path):
    # 3 processes x 2 devices as fsdp=2 x sequence=3: process 1 holds a device of each
    # fsdp group, so its rows would overlap both neighbours'.
    over = [o for o in ACROSS if not o.startswith(("mesh.", "model.max", "data.seq"))]
    over += ["mesh.fsdp=2", "mesh.sequence=3", "data.seq_len=48", "model.max_seq_len=48"]
    argv = [sys.executable, "-m", "jaxlm.cli", "launch", "local", "--workdir", str(tmp_path)]
    argv += ["--nodes", "3", "--cpu-devices", "2", "--port", str(free_port()), *over]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    # Each process says it; the processes share stderr, so another's output may run into
    # a line: every line says it, and the shortest is the sentence itself.
    errors = re.findall(r"jaxlm train: error: (.*)", done.stderr)
    assert errors and "Traceback" not in done.stderr
    assert all("splits the batch rows unevenly" in e for e in errors)
    assert_one_sentence(min(errors, key=len))
    assert not (tmp_path / "checkpoints").exists()


# Elastic resume: the same run, its process count changing at each restart.
ELASTIC = [o for o in OVERRIDES if not o.startswith(("mesh.", "train.steps", "checkpoint."))]
# A constant learning rate after warmup: each stage stops at its own train.steps, which
# must not bend the schedule (it stretches over train.steps).
ELASTIC += ["checkpoint.every_steps=2", "train.sample_tokens=0", "optimizer.min_lr_ratio=1.0"]


def _train_argv(workdir: Path, processes: int, steps: int) -> list[str]:
    """`jaxlm train` to `steps` on `processes` local processes of one CPU device each."""
    argv = [sys.executable, "-m", "jaxlm.cli"]
    over = [*ELASTIC, f"train.steps={steps}"]
    if processes == 1:
        return argv + ["train", "--workdir", str(workdir), "--no-progress", *over]
    argv += ["launch", "local", "--workdir", str(workdir), "--nodes", str(processes)]
    return argv + ["--cpu-devices", "1", "--port", str(free_port()), *over]


def _train(workdir: Path, processes: int, steps: int) -> None:
    done = subprocess.run(
        _train_argv(workdir, processes, steps), env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


def _data_positions(workdir: Path) -> dict[int, dict]:
    """Every checkpoint's data position: each stream's iterator state, merged over the files
    of the processes that wrote it. Equal positions mean the same documents were consumed."""
    out = {}
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            streams = {}
            for f in sorted((step_dir / "data_iter").glob("process_*-of-*.json")):
                streams.update(json.loads(f.read_text())["streams"])
            out[int(step_dir.name)] = streams
    return out


def _assert_same_run(elastic: Path, straight: Path, steps: int) -> None:
    got, _ = _train_losses(elastic)
    want, _ = _train_losses(straight)
    assert len(want) == steps
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The data order, directly: at every step both runs saved, each stream stood at the
    # same place, so the same documents had been read in the same order.
    got_pos, want_pos = _data_positions(elastic), _data_positions(straight)
    common = sorted(set(got_pos) & set(want_pos))
    assert len(common) >= 2 and all(want_pos[step] for step in common)
    for step in common:
        assert got_pos[step] == want_pos[step], step


def test_resume_on_another_process_count_continues_the_same_run(tmp_path):
    # 2 processes train to step 2; the job comes back on 1 process to step 4, then on 4
    # processes to step 6. Each restart picks up the data where the checkpoint left it
    # (streams are saved by global index, not per process), so every step's loss equals
    # that of one uninterrupted process.
    elastic, straight = tmp_path / "elastic", tmp_path / "straight"
    for processes, steps in ((2, 2), (1, 4), (4, 6)):
        _train(elastic, processes, steps)
    _train(straight, 1, 6)
    _assert_same_run(elastic, straight, 6)


@pytest.mark.slow
def test_a_killed_two_process_job_resumes_on_one_then_four_processes(tmp_path):
    # A pod loses its hosts: both processes are killed (SIGKILL) mid-run, after some
    # checkpoint k. The job comes back on 1 process for 2 steps, then on 4 for 2 more.
    elastic, straight = tmp_path / "elastic", tmp_path / "straight"
    job = subprocess.Popen(
        _train_argv(elastic, 2, 10_000), env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not _committed(elastic) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL  # it was still training when the hosts went
    k = max(_committed(elastic))
    _train(elastic, 1, k + 2)
    _train(elastic, 4, k + 4)
    _train(straight, 1, k + 4)
    _assert_same_run(elastic, straight, k + 4)


def _committed(workdir: Path) -> list[int]:
    """Committed checkpoint steps (Orbax renames a step into place once it is complete)."""
    ckpt = workdir / "checkpoints"
    return [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []


def _probe(env_for_rank, n: int = 2) -> list[list]:
    """Start n processes that only join through jaxlm.distributed.initialize()."""
    code = (
        "import json, jax; from jaxlm.parallel.distributed import initialize; layout = initialize(); "
        "print(json.dumps([layout.source, jax.process_index(), jax.process_count(), "
        "jax.device_count()]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=_env(**env_for_rank(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_slurm_variables_alone_join_the_processes():
    port = str(free_port())
    slurm = lambda i: {  # noqa: E731 - what srun sets for task i of a 2-task step on one node
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(i),
        "SLURM_LOCALID": str(i),
        "JAX_COORDINATOR_PORT": port,
    }
    assert _probe(slurm) == [["slurm", 0, 2, 2], ["slurm", 1, 2, 2]]


def test_jobset_variables_join_the_processes():
    port = free_port()
    jobset = lambda i: {  # noqa: E731 - what the k8s manifest sets for pod i
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i),
    }
    assert _probe(jobset) == [["env", 0, 2, 2], ["env", 1, 2, 2]]


# ------------------------------------------------------------- layout resolution, in-process


def test_flags_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    layout = resolve_layout("127.0.0.1:9", 2, 1, env=env, cluster="slurm")
    assert (layout.source, layout.coordinator, layout.num_processes, layout.process_id) == (
        "explicit",
        "127.0.0.1:9",
        2,
        1,
    )


def test_jobset_environment_wins_over_cluster_detection():
    env = {"JAX_COORDINATOR_ADDRESS": "pod-0:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    layout = resolve_layout(env=env, cluster="slurm")
    assert (layout.source, layout.num_processes, layout.process_id) == ("env", 4, 2)


def test_nothing_set_is_a_single_process():
    assert resolve_layout(env={}, cluster=None).source == "single"
    assert resolve_layout(env={"SLURM_NTASKS": "1"}, cluster="slurm").source == "single"
    assert resolve_layout(env={"SLURM_NTASKS": "8"}, cluster="slurm").source == "slurm"


@pytest.mark.parametrize(
    "kwargs, env, expected",
    [
        (dict(coordinator="h:1"), {}, r"go together"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), {}, r"--process-id=2 .*\[0, 2\)"),
        ({}, {"JAX_NUM_PROCESSES": "2"}, r"JAX_NUM_PROCESSES set without"),
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
            r"JAX_NUM_PROCESSES='two' must be an integer",
        ),
    ],
)
def test_inconsistent_layout_is_refused(kwargs, env, expected):
    with pytest.raises(ConfigError, match=expected):
        resolve_layout(**kwargs, env=env, cluster=None)


def test_jax_detects_slurm_from_its_variables(monkeypatch):
    for key, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu[003-004]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    assert jax_cluster() == "slurm"
    from jax._src import clusters

    coordinator, n, i, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 10
    )
    assert coordinator.startswith("gpu003:") and (n, i) == (2, 1)
