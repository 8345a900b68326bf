"""Runs in a Google Cloud Storage bucket (jaxlm.paths, jaxlm.train.object_store) against a GCS
emulator on 127.0.0.1 (gcp-storage-emulator, started by the `gcs_server` fixture): Orbax
checkpoints through tensorstore's gcs driver, metrics and the workdir lock through gcsfs, and
`jaxlm data prepare` + `jaxlm train -w gs://...` as subprocesses. The same cases on s3:// are in
test_object_store.py and test_object_store_run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, new_gcs_bucket, tiny_texts

from jaxlm.config import CheckpointConfig
from jaxlm.errors import ConfigError
from jaxlm.paths import as_path, check_reachable
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.lock import WorkdirLock
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.resume import rewind_metrics
from jaxlm.train.status import read_records


def _tree(v: float) -> dict[str, jax.Array]:
    return {"w": jnp.arange(64.0) + v, "step": jnp.int32(v)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0.0))


def test_checkpoints_in_gcs_keep_commit_restore_and_park_damage(gcs_server):
    root = as_path(new_gcs_bucket(gcs_server)) / "run/checkpoints"
    ckpt = Checkpointer(root, CheckpointConfig(keep=2))
    for step in (1, 2, 3):
        ckpt.save(step, _tree(step), None, {"step": step})
    ckpt.close()
    # keep=2 (Orbax deletes step 1 on gs://), each committed by its commit file
    assert Checkpointer(root, CheckpointConfig(), read_only=True).all_steps() == [2, 3]
    assert (root / "3" / "commit_success.txt").exists()
    assert not (root / "1").exists()

    # The newest step loses its array data: a training run skips it, parks it, resumes at 2.
    fs, key = fsspec.core.url_to_fs(f"{root}/3/state")
    data = [k for k in fs.find(key) if "/d/" in k]
    assert data
    fs.rm(data)
    (root / "4").mkdir()  # an interrupted save: a step directory with no commit file
    (root / "4" / "junk").write_text("x")
    ckpt = Checkpointer(root, CheckpointConfig(keep=2))
    got = ckpt.restore_latest(_abstract(), move_damaged=True, log=print)
    assert got.step == 2 and got.config == {"step": 2}
    assert np.array_equal(np.asarray(got.state["w"]), np.arange(64.0) + 2)
    parked = sorted(p.name.split("-")[0] for p in (root.parent / "checkpoints.damaged").iterdir())
    assert parked == ["3", "4"]
    ckpt.save(3, _tree(7.0), None, {"step": 3})
    ckpt.close()
    again = Checkpointer(root, CheckpointConfig(), read_only=True)
    restored = again.restore(3, _abstract())
    again.close()
    assert np.array_equal(np.asarray(restored["w"]), np.arange(64.0) + 7.0)
    assert int(restored["step"]) == 7


def test_metrics_and_lock_in_gcs(gcs_server):
    workdir = as_path(new_gcs_bucket(gcs_server)) / "run"
    writer = MetricsWriter(workdir)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    assert [r["step"] for r in read_records(workdir / "metrics.jsonl")] == [1, 2, 3]
    writer.close()
    assert rewind_metrics(workdir / "metrics.jsonl", 2) == 1
    writer = MetricsWriter(workdir)
    writer.write(3, {"loss": 0.5})
    writer.close()
    rows = read_records(workdir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    assert any(p.name.startswith("events.out") for p in (workdir / "tensorboard").iterdir())

    first = WorkdirLock(workdir)
    first.acquire()
    with pytest.raises(ConfigError, match="in use by a jaxlm run"):
        WorkdirLock(workdir).acquire()
    record = json.loads((workdir / "train.lock").read_text())
    record["pid"] = 2**22 + 12345  # a pid that does not run on this host
    (workdir / "train.lock").write_text(json.dumps(record))
    second = WorkdirLock(workdir)
    second.acquire()
    second.release()
    assert not (workdir / "train.lock").exists()
    with pytest.raises(ConfigError, match="does not exist or is not visible"):
        check_reachable("gs://jaxlm-no-such-bucket/run", "--workdir")


# Slow, and flaky on a loaded machine: gcp-storage-emulator sends no x-goog-generation header
# and ignores ifGenerationMatch, so when an OCDBT manifest is rewritten (a commit split in two
# batches) tensorstore's conditional write fails with "Malformed StorageGeneration".
@pytest.mark.slow
@pytest.mark.xfail(reason="the GCS emulator lacks object generations", strict=False)
def test_prepare_and_train_in_gcs(gcs_server, tiny_tok, tmp_path):
    bucket = new_gcs_bucket(gcs_server)
    env = {**os.environ, **gcs_server, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, text in enumerate(tiny_texts(n_texts=12, lines=20)):
        (texts / f"t{i:02d}.txt").write_text(text, encoding="utf-8")

    def jaxlm(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "jaxlm.cli", *args], env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]

    data, run = f"{bucket}/data", f"{bucket}/run"
    jaxlm("data", "prepare", "--input", str(texts / "*.txt"), "--tokenizer", tiny_tok.path,
          "--output", data, "--workers", "1", "--no-progress")  # fmt: skip
    overrides = [
        *TINY_MODEL, "model.vocab_size=400", "train.batch_size=4", "train.steps=4",
        "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_tokens=0", "optimizer.warmup_steps=1", "checkpoint.every_steps=2",
        "checkpoint.keep=1", f"data.corpus={data}", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    jaxlm("train", "-w", run, "--no-progress", *overrides)
    rows = [r for r in read_records(as_path(run) / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert Checkpointer(f"{run}/checkpoints", CheckpointConfig(), read_only=True).all_steps() == [4]
    assert not as_path(f"{run}/train.lock").exists()
