"""Runs in a Google Cloud Storage bucket against a GCS emulator on 127.0.0.1
(gcp-storage-emulator, started by the `gcs_server` fixture): the missing-bucket error, and
`jaxlm data prepare` + `jaxlm train -w gs://...` as subprocesses. Checkpoints, metrics and the
lock run on gs:// and s3:// alike in test_object_store.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TINY_MODEL, new_gcs_bucket, tiny_texts

from jaxlm.config import CheckpointConfig
from jaxlm.errors import ConfigError
from jaxlm.paths import as_path, check_reachable
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.status import read_records


def test_a_missing_gcs_bucket_is_one_sentence(gcs_server):
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
