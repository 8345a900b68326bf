"""Checkpoint checksums (jaxlm.train.integrity) and content-checked resume (jaxlm.train.resume):
flipped bytes send a run back to the previous good step, bit-exact; another tokenizer or
corpus is refused unless --allow-data-change."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_TRAIN, assert_one_sentence, cli_error

from jaxlm import cli
from jaxlm.config import CheckpointConfig, load_config
from jaxlm.data.corpus import load_builtin_works
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.runs import abstract_params
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.integrity import CHECKSUMS, DamagedCheckpoint, verify_checksums, write_checksums
from jaxlm.train.resume import check_same_data, data_change, data_identity

TINY = TINY_TRAIN


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --- checksums --------------------------------------------------------------------------------


def test_checksums_catch_flipped_missing_and_unrecorded_files(tmp_path):
    step = tmp_path / "7"
    (step / "state").mkdir(parents=True)
    (step / "state" / "data").write_bytes(bytes(range(256)) * 4)
    (step / "meta").write_text("{}")
    assert verify_checksums(step) is False  # no record: an older save, restored unchecked
    write_checksums(step)
    assert verify_checksums(step) is True
    _flip_byte(step / "state" / "data")
    with pytest.raises(DamagedCheckpoint, match="state/data does not match the checksum"):
        verify_checksums(step)
    (step / "state" / "data").unlink()
    with pytest.raises(DamagedCheckpoint, match="state/data is missing"):
        verify_checksums(step)


def _tree(v: float) -> dict[str, jax.Array]:
    return {"w": jnp.arange(64, dtype=jnp.float32) * v}


def test_async_saves_are_checksummed_and_a_flipped_step_is_parked(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig(keep=5))
    for step in (1, 2, 3):
        ckpt.save(step, _tree(step), None, {"step": step})
    ckpt.close()
    for step in (1, 2, 3):
        assert verify_checksums(tmp_path / "c" / str(step))
    _flip_byte(_largest_file(tmp_path / "c" / "3" / "state"))

    messages: list[str] = []
    reader = Checkpointer(tmp_path / "c", CheckpointConfig(), read_only=True)
    with pytest.raises(DamagedCheckpoint) as e:  # asked for by step: one sentence
        reader.restore(3, _tree(0.0))
    assert_one_sentence(str(e.value))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0.0))
    got = reader.restore_latest(abstract, log=messages.append)
    reader.close()
    assert got.step == 2 and np.array_equal(got.state["w"], _tree(2.0)["w"])
    assert any("step 3" in m and "does not match the checksum" in m for m in messages)

    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig(keep=5))
    assert ckpt.restore_latest(abstract, move_damaged=True, log=messages.append).step == 2
    assert ckpt.all_steps() == [1, 2]
    (parked,) = (tmp_path / "c.damaged").iterdir()
    assert parked.name.startswith("3-") and (parked / CHECKSUMS).is_file()
    ckpt.close()


# --- real runs: bit-exact fallback, tokenizer and corpus --------------------------------------


def _losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def _params(workdir: Path, step: int):
    cfg = load_config(workdir / "config.yaml")
    _, abstract = abstract_params(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint, read_only=True)
    try:
        return jax.device_get(ckpt.restore_params(step, abstract))
    finally:
        ckpt.close()


def _train(workdir: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert cli.main(["train", "-w", str(workdir), "--no-progress", *TINY, *extra]) == 0
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def run4(tmp_path_factory) -> Path:
    """An uninterrupted tiny run of 4 steps, with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("run4") / "run"
    assert cli.main(["train", "-w", str(workdir), "--no-progress", *TINY, "train.steps=4"]) == 0
    return workdir


def test_flipped_newest_checkpoint_resumes_from_the_previous_step_bit_exact(run4, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run4, workdir)
    _flip_byte(_largest_file(workdir / "checkpoints" / "4" / "state"))
    (workdir / "checkpoints" / "4" / "commit_success.txt").touch()  # still looks committed

    err = _train(workdir, capsys, "train.steps=4")
    assert "Checkpoint step 4" in err and "does not match the checksum" in err
    assert "Resumed from checkpoint step 2" in err
    (parked,) = (workdir / "checkpoints.damaged").iterdir()
    assert parked.name.startswith("4-")
    assert _losses(workdir) == _losses(run4)
    for a, b in zip(
        jax.tree.leaves(_params(workdir, 4)), jax.tree.leaves(_params(run4, 4)), strict=True
    ):
        assert np.array_equal(a, b)


def test_swapped_tokenizer_is_refused_unless_allowed(run4, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run4, workdir)
    before = load_tokenizer(str(workdir / "tokenizer.model"))
    text = [w.text for w in load_builtin_works()[-1:]]  # other text, the same vocabulary size
    swapped = train_tokenizer(text, str(workdir / "tokenizer.model"), vocab_size=512)
    assert swapped.sha256 != before.sha256 and swapped.vocab_size == before.vocab_size

    err = cli_error(["train", "-w", str(workdir), "--no-progress", *TINY, "train.steps=5"], capsys)
    message = err.removeprefix("jaxlm train: error: ")
    assert_one_sentence(message)
    assert "tokenizer" in message and swapped.sha256[:12] in message
    assert before.sha256[:12] in message and "--allow-data-change" in message
    assert sorted(_losses(workdir)) == [1, 2, 3, 4]  # nothing rewound or retrained

    err = _train(workdir, capsys, "train.steps=5", "--allow-data-change")
    assert "Resuming on changed data" in err and "Resumed from checkpoint step 4" in err
    # The new checkpoint records the new tokenizer: resuming again needs no flag.
    _train(workdir, capsys, "train.steps=6")


class _FakeTokenizer:
    path, sha256 = "t.model", "0" * 64


def test_corpus_fingerprint_sees_added_and_changed_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"Text {name}.\n")
    cfg = load_config(None, [f"data.corpus={tmp_path}/*.txt"])
    fake = _FakeTokenizer()
    saved = data_identity(cfg, fake)
    assert saved["corpus"]["files"] == 2
    assert data_change(saved, data_identity(cfg, fake), cfg) is None
    assert data_change(None, data_identity(cfg, fake), cfg) is None  # an older checkpoint

    (tmp_path / "c.txt").write_text("Text c.\n")
    change = data_change(saved, data_identity(cfg, fake), cfg)
    assert "2 of 16 bytes then, 3 of 24 bytes now" in change
    (tmp_path / "c.txt").unlink()
    (tmp_path / "b.txt").write_text("Text B!\n")  # same size, other content and date
    os.utime(tmp_path / "b.txt", (1, 1))
    assert data_change(saved, data_identity(cfg, fake), cfg) is not None


def test_changed_corpus_refusal_is_one_sentence(tmp_path):
    cfg = load_config(None, [])
    fake = _FakeTokenizer()
    saved = {"data_identity": {**data_identity(cfg, fake), "corpus": {"sha256": "x"}}}
    with pytest.raises(ConfigError) as e:
        check_same_data(saved, data_identity(cfg, fake), cfg, tmp_path, allow=False)
    assert_one_sentence(str(e.value))
    check_same_data(saved, data_identity(cfg, fake), cfg, tmp_path, allow=True)
