"""Runs in a bucket (jaxlm.paths, jaxlm.train.object_store): checkpoints, metrics and the lock
on both stores, against a real S3-compatible server (moto's server mode, the `s3_server`
fixture) and a GCS emulator (the `gcs_server` fixture) on 127.0.0.1, and the errors; the
whole `jaxlm train` / kill / resume / eval / generate cycle on s3:// is in
test_object_store_run.py, and on gs:// in test_object_store_gcs.py."""

from __future__ import annotations

import json
import sys

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import s3fs
from conftest import new_bucket, new_gcs_bucket

from jaxlm.config import CheckpointConfig
from jaxlm.errors import ConfigError
from jaxlm.paths import as_path, check_reachable, local_copy
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.lock import WorkdirLock
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.resume import rewind_metrics
from jaxlm.train.status import read_records


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> str:
    """A fresh bucket on the S3 server or on the GCS emulator: 's3://NAME' or 'gs://NAME'."""
    if request.param == "s3":
        return new_bucket(request.getfixturevalue("s3_server"))
    return new_gcs_bucket(request.getfixturevalue("gcs_server"))


def _tree(v: float) -> dict[str, jax.Array]:
    return {"w": jnp.arange(64.0) + v, "step": jnp.int32(v)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0.0))


def test_checkpoints_in_a_bucket_keep_commit_restore_and_park_damage(bucket):
    root = as_path(bucket) / "run/checkpoints"
    ckpt = Checkpointer(root, CheckpointConfig(keep=2))
    for step in (1, 2, 3):
        ckpt.save(step, _tree(step), None, {"step": step})
    ckpt.close()
    # keep=2 (Orbax deletes step 1), each committed by its commit file (no directory rename)
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


def test_metrics_in_a_bucket_survive_reopening_and_rewind(bucket):
    workdir = as_path(bucket) / "run"
    writer = MetricsWriter(workdir)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    # Each record is in the bucket as soon as it is written (no close needed).
    assert [r["step"] for r in read_records(workdir / "metrics.jsonl")] == [1, 2, 3]
    writer.close()
    assert rewind_metrics(workdir / "metrics.jsonl", 2) == 1
    writer = MetricsWriter(workdir)
    writer.write(3, {"loss": 0.5})
    writer.close()
    rows = read_records(workdir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    assert any(p.name.startswith("events.out") for p in (workdir / "tensorboard").iterdir())


def test_lock_in_a_bucket_refuses_a_live_holder_and_takes_over_a_dead_one(bucket):
    workdir = as_path(bucket) / "run"
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


def test_unusable_buckets_and_schemes_are_one_sentence(s3_server):
    with pytest.raises(ConfigError, match="does not exist or is not visible"):
        check_reachable("s3://no-such-bucket-here/run", "--workdir")
    with pytest.raises(ConfigError, match="scheme 'hdfs://'"):
        as_path("hdfs://cluster/run", "--workdir")
    with pytest.raises(ConfigError, match="names no bucket"):
        as_path("s3:///run", "--workdir")


def test_a_bucket_that_cannot_be_reached_names_the_endpoint_fix(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # clients read the endpoint when first made
    try:
        with pytest.raises(ConfigError) as e:
            check_reachable("s3://jaxlm-unreachable/run", "--workdir")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "AWS_ENDPOINT_URL" in str(e.value) and "jaxlm-test-secret" not in str(e.value)


def test_missing_client_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if jaxlm[gcs] were not installed
    with pytest.raises(ConfigError, match=r'pip install "jaxlm\[gcs\]"'):
        as_path("gs://some-bucket/run", "--workdir")


def test_missing_credentials_are_named_without_a_secret(s3_server, monkeypatch, tmp_path):
    bucket = new_bucket(s3_server)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ConfigError, match="no credentials were found"):
            check_reachable(bucket + "/run", "--workdir")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_local_copy_fetches_an_object_again_once_it_is_rewritten(s3_server, tmp_path):
    obj = as_path(new_bucket(s3_server)) / "data" / "shard.bin"
    obj.write_bytes(b"first-version")
    first = local_copy(obj, tmp_path)
    assert first.read_bytes() == b"first-version"
    assert local_copy(obj, tmp_path) == first  # cached: the same local file, not copied again
    obj.write_bytes(b"other-version")  # same size, new content (a new ETag)
    again = local_copy(obj, tmp_path)
    assert again != first and again.read_bytes() == b"other-version"
