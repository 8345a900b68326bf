"""A run that lives in a bucket, end to end, against a real S3-compatible server on 127.0.0.1:
`jaxlm data prepare` writes shards to s3://, `jaxlm train -w s3://...` trains on them with
checkpoints, is SIGKILLed mid-run, resumes with the same command to the losses and parameters
of an uninterrupted run whose workdir is local, and `jaxlm eval` and `generate` read the run
from the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FAST_XLA, TINY_HOSTS, TINY_MODEL, free_port, new_bucket, tiny_texts

from jaxlm.config import load_config
from jaxlm.paths import as_path
from jaxlm.runs import abstract_params
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.status import read_records

STEPS = 16
RUN = [
    *TINY_MODEL,
    "model.vocab_size=400",
    "train.batch_size=4",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optimizer.warmup_steps=2",
    "checkpoint.every_steps=4",
    "checkpoint.keep=2",
]


def _jaxlm(env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jaxlm.cli", *args], env=env, stdout=out, stderr=out
        )


def _finish(proc: subprocess.Popen, log: Path) -> None:
    rc = proc.wait(timeout=600)
    assert rc == 0, log.read_text(errors="replace")[-4000:]


def _losses(workdir) -> dict[int, tuple[float, float]]:
    rows = [r for r in read_records(as_path(workdir) / "metrics.jsonl") if r["split"] == "train"]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def _state(workdir):
    cfg = load_config(as_path(workdir) / "config.yaml")
    abstract, _ = abstract_params(cfg)
    ckpt = Checkpointer(as_path(workdir) / "checkpoints", cfg.checkpoint, read_only=True)
    try:
        return jax.device_get(ckpt.restore(ckpt.latest_step(), abstract))
    finally:
        ckpt.close()


def test_prepare_train_kill_resume_eval_generate_in_s3(s3_server, tiny_tok, tmp_path):
    bucket = new_bucket(s3_server)
    env = {
        **os.environ,
        **s3_server,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    log = tmp_path / "jaxlm.log"
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, text in enumerate(tiny_texts(n_texts=24, lines=30)):
        (texts / f"t{i:02d}.txt").write_text(text, encoding="utf-8")

    # Shards into the bucket.
    data = f"{bucket}/data"
    _finish(
        _jaxlm(env, "data", "prepare", "--input", str(texts / "*.txt"), "--tokenizer",
               tiny_tok.path, "--output", data, "--workers", "1", "--no-progress", log=log),
        log,
    )  # fmt: skip
    assert as_path(f"{data}/manifest.json").exists()
    run_args = [*RUN, f"data.corpus={data}", f"data.cache_dir={tmp_path / 'cache'}"]

    # The reference: the same command with a local workdir, never interrupted.
    local = tmp_path / "local"
    _finish(_jaxlm(env, "train", "-w", str(local), "--no-progress", *run_args, log=log), log)
    assert sorted(_losses(local)) == list(range(1, STEPS + 1))

    # In the bucket: killed after its checkpoint at step 8, then started again.
    remote = f"{bucket}/run"
    job = _jaxlm(env, "train", "-w", remote, "--no-progress", *run_args, log=log)
    deadline = time.monotonic() + 300
    while not any(s >= 10 for s in _losses(remote)):
        assert job.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "the s3 run did not reach step 10"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    assert job.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill"
    _finish(_jaxlm(env, "train", "-w", remote, "--no-progress", *run_args, log=log), log)
    assert _losses(remote) == _losses(local)
    for (path, a), (_, b) in zip(
        jax.tree.flatten_with_path(_state(remote))[0],
        jax.tree.flatten_with_path(_state(local))[0],
        strict=True,
    ):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)

    status = tmp_path / "status.json"
    with open(status, "wb") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "jaxlm.cli", "status", remote, "--json"],
            env=env, stdout=f, stderr=subprocess.PIPE, timeout=120,
        ).returncode  # fmt: skip
    assert rc == 0
    report = json.loads(status.read_text())
    assert report["step"] == STEPS and report["restarts"] == 1 and report["killed_sessions"] == 1

    # An export into the bucket; eval and generate read the run and the export from the bucket
    # and agree with the local run.
    export = f"{bucket}/export"
    _finish(_jaxlm(env, "export", "-w", remote, "-o", export, log=log), log)
    assert as_path(f"{export}/export.json").exists()
    out: dict[str, dict] = {}
    for name, workdir in (("remote", remote), ("export", export), ("local", str(local))):
        ev, gen = tmp_path / f"eval-{name}.json", tmp_path / f"generate-{name}.jsonl"
        _finish(_jaxlm(env, "eval", "--checkpoint", workdir, "--output", str(ev), log=log), log)
        out[name] = {"eval": json.loads(ev.read_text())}
        if name == "export":
            continue  # the same parameters as the run: its eval shows they were read back
        _finish(
            _jaxlm(env, "generate", "--checkpoint", workdir, "--prompt", "The",
                   "--max-new-tokens", "8", "--temperature", "0", "--output", str(gen),
                   "--no-stream", log=log),
            log,
        )  # fmt: skip
        out[name]["generate"] = gen.read_text()
    assert out["remote"]["eval"]["checkpoint"] == remote
    assert out["remote"]["eval"]["results"][0]["tokens"] > 0
    for name in ("remote", "export"):
        assert out[name]["eval"]["results"] == out["local"]["eval"]["results"], name
    assert out["remote"]["generate"] == out["local"]["generate"]
    assert json.loads(out["remote"]["generate"])["prompt"] == "The"


@pytest.mark.slow  # ~70 s on 2 cores: two runs of two processes
def test_two_processes_train_one_run_in_s3(s3_server, tmp_path):
    # 2 processes x 2 devices, fsdp across them, into a bucket: process 0 trains the tokenizer
    # and caches the tokens in the bucket, both write their checkpoint shards there; the
    # losses equal one process on 4 devices with a local workdir.
    overrides = [*TINY_HOSTS, "train.sample_tokens=8", "checkpoint.every_steps=2"]
    overrides += ["mesh.fsdp=2", "mesh.tensor=2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env = {**env, **s3_server, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_XLA}
    cli = [sys.executable, "-m", "jaxlm.cli"]
    remote, local = f"{new_bucket(s3_server)}/run", tmp_path / "local"
    port = free_port()
    two = subprocess.run(
        [*cli, "launch", "local", "--workdir", remote, "--nodes", "2", "--cpu-devices", "2",
         "--port", str(port), *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    four = {**env, "XLA_FLAGS": f"{FAST_XLA} --xla_force_host_platform_device_count=4"}
    one = subprocess.run(
        [*cli, "train", "--workdir", str(local), "--no-progress", *overrides],
        env=four, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    got, want = _losses(remote), _losses(local)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=2e-5)
    steps = Checkpointer(f"{remote}/checkpoints", load_config(local / "config.yaml").checkpoint,
                         read_only=True).all_steps()  # fmt: skip
    assert steps == [2, 3]
    assert as_path(f"{remote}/tokenizer.model").exists()
    assert not as_path(f"{remote}/train.lock").exists()
