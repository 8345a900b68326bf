"""`jaxlm data prepare` (jaxlm.data.prepare): formats, shards, manifest, resumption, bad data,
and the checks that tie prepared data to a training run."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_XLA, paragraph, write_corpus

from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.data.prepare import prepare
from jaxlm.data.shards import open_prepared
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import ConfigError


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    rng = random.Random(1)
    texts = [paragraph(rng, 30) + " naïve 東京" for _ in range(50)]
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    train_tokenizer(texts, str(path), vocab_size=320)
    return str(path)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _quiet(msg: str) -> None:
    pass


# --- preparation ------------------------------------------------------------------------------


def test_prepare_round_trips_every_format_and_counts_right(tmp_path, tok_path):
    expected = write_corpus(tmp_path / "in")
    manifest = prepare(
        [str(tmp_path / "in" / "*")], tok_path, tmp_path / "out", shard_bytes=300,
        progress=False, log=_quiet,
    )  # fmt: skip
    ds = open_prepared(tmp_path / "out")
    tok = load_tokenizer(tok_path)
    wanted = [d for name in sorted(expected) for d in expected[name]]  # sorted paths, file order
    assert ds.num_documents == len(wanted) == manifest["documents"] and len(ds) == len(wanted)
    for i, text in enumerate(wanted):
        ids = ds.document(i)
        assert ids.dtype == np.int32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(ds[i], ids)
    assert len(manifest["shards"]) > 2  # small shards: several
    assert ds.num_tokens == sum(len(ds.document(i)) for i in range(len(ds)))
    assert manifest["bytes"] == sum(len(t.encode("utf-8")) for t in wanted)
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["tokenizer"]["vocab_size"] == 320 and manifest["dtype"] == "uint16"
    assert [Path(s["path"]).name for s in manifest["sources"]] == sorted(expected)
    assert all(s["size"] > 0 and s["mtime_ns"] > 0 for s in manifest["sources"])
    assert sum(manifest["skipped"].values()) == 0
    # Grain worker processes receive the source pickled: it reopens the files by path.
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.document(len(ds) - 1), ds.document(len(ds) - 1))


def test_blank_line_split_and_parallel_workers_give_identical_shards(tmp_path, tok_path):
    rng = random.Random(3)
    paragraphs = [paragraph(rng) for _ in range(9)]
    (tmp_path / "poem.txt").write_text("\n\n  \n".join(paragraphs) + "\n", encoding="utf-8")
    kwargs = dict(split="blank-lines", shard_bytes=200, progress=False, log=_quiet)
    prepare([str(tmp_path / "poem.txt")], tok_path, tmp_path / "one", workers=1, **kwargs)
    prepare([str(tmp_path / "poem.txt")], tok_path, tmp_path / "two", workers=2, **kwargs)
    ds = open_prepared(tmp_path / "one")
    tok = load_tokenizer(tok_path)
    assert [tok.decode(ds.document(i)) for i in range(len(ds))] == paragraphs
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


def test_rerun_skips_finished_shards_and_keeps_bytes(tmp_path, tok_path):
    write_corpus(tmp_path / "in")
    args = ([str(tmp_path / "in" / "*")], tok_path, tmp_path / "out")
    first = prepare(*args, shard_bytes=300, progress=False, log=_quiet)
    before = _digest(tmp_path / "out")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    second = prepare(*args, shard_bytes=300, progress=False, log=_quiet)
    assert second["_run"]["written"] == 0 and second["_run"]["reused"] == len(first["shards"])
    assert _digest(tmp_path / "out") == before
    shard_files = [n for n in mtimes if n.startswith("shard-")]
    assert all((tmp_path / "out" / n).stat().st_mtime_ns == mtimes[n] for n in shard_files)
    # Different settings or tokenizer for the same directory: refused, nothing touched.
    with pytest.raises(ConfigError, match="shard_bytes"):
        prepare(*args, shard_bytes=999, progress=False, log=_quiet)
    assert _digest(tmp_path / "out") == before


def test_bad_data_is_skipped_counted_and_reported(tmp_path, tok_path):
    good = tmp_path / "good.txt"
    good.write_text("Fine text.", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    lines = ['{"text": "ok one"}', '{"body": "no text field"}', "not json", '{"text": "  "}']
    lines += ['{"text": "ok two"}']
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "broken.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "ok three"}\n')
    messages: list[str] = []
    manifest = prepare(
        [str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")], tok_path, tmp_path / "out",
        progress=False, log=messages.append,
    )  # fmt: skip
    assert manifest["skipped"] == {
        "empty": 2,  # empty.txt and the blank JSONL text
        "invalid_utf8": 2,  # latin1.txt and one line of broken.jsonl
        "bad_json": 1,
        "missing_field": 1,
        "filtered_out": 0,  # no filters asked for (tests/test_data_formats.py has them)
        "too_short": 0,
        "too_long": 0,
    }
    assert manifest["documents"] == 4  # good.txt, ok one, ok two, ok three
    report = "\n".join(messages)
    # One line per reason, naming its first occurrence (inputs are read in sorted order).
    assert "2 invalid utf8 item(s) (first: " + str(tmp_path / "broken.jsonl:1") in report
    assert "1 missing field item(s) (first: " + str(tmp_path / "mixed.jsonl:2") in report
    assert "1 bad json item(s) (first: " + str(tmp_path / "mixed.jsonl:3") in report
    assert "2 empty item(s) (first: " + str(tmp_path / "empty.txt") in report


def test_wrong_text_field_and_no_usable_input_are_errors(tmp_path, tok_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"content": "a"}\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="--text-field"):
        prepare([str(tmp_path / "x.jsonl")], tok_path, tmp_path / "o1", progress=False)
    (tmp_path / "pretty.json").write_text('{\n  "text": "a"\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON Lines"):
        prepare([str(tmp_path / "pretty.json")], tok_path, tmp_path / "o4", progress=False)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="no usable documents"):
        prepare(
            [str(tmp_path / "empty.txt")], tok_path, tmp_path / "o2", progress=False, log=_quiet
        )
    argv = ["data", "prepare", "--input", str(tmp_path / "none*.txt"), "--tokenizer", tok_path]
    assert cli.main([*argv, "--output", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No files match" in err[0]


def test_failed_run_leaves_finished_shards_readable_and_a_rerun_completes(tmp_path, tok_path):
    write_corpus(tmp_path / "in")
    bad = tmp_path / "in" / "z.jsonl"  # sorts last: fails after earlier shards are written
    bad.write_text('{"content": "wrong key"}\n', encoding="utf-8")
    args = ([str(tmp_path / "in" / "*")], tok_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="--text-field"):
        prepare(*args, shard_bytes=300, progress=False, log=_quiet)
    with pytest.raises(ConfigError, match="did not finish"):
        open_prepared(tmp_path / "out")
    partial = open_prepared(tmp_path / "out", allow_incomplete=True)
    written = len(partial.manifest["shards"])
    assert written >= 2 and partial.num_documents > 0
    tok = load_tokenizer(tok_path)
    assert tok.decode(partial.document(0)).startswith("Document 0")
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())
    # Fix the file and run again: the finished shards are verified and kept, the rest written.
    bad.write_text('{"text": "now right"}\n', encoding="utf-8")
    done = prepare(*args, shard_bytes=300, progress=False, log=_quiet)
    assert done["complete"] and done["_run"]["reused"] == written
    assert tok.decode(open_prepared(tmp_path / "out").document(-1)) == "now right"


def test_changed_input_under_a_finished_shard_is_refused(tmp_path, tok_path):
    write_corpus(tmp_path / "in")
    args = ([str(tmp_path / "in" / "*")], tok_path, tmp_path / "out")
    prepare(*args, shard_bytes=300, progress=False, log=_quiet)
    before = _digest(tmp_path / "out")
    (tmp_path / "in" / "a0.txt").write_text("Rewritten.", encoding="utf-8")
    with pytest.raises(ConfigError, match="inputs changed"):
        prepare(*args, shard_bytes=300, progress=False, log=_quiet)
    assert _digest(tmp_path / "out") == before
    other_tok = tmp_path / "other.model"
    train_tokenizer(["completely different words here"] * 20, str(other_tok), vocab_size=300)
    with pytest.raises(ConfigError, match="tokenizer_sha256"):
        prepare([args[0][0]], str(other_tok), args[2], shard_bytes=300, progress=False)
    assert _digest(tmp_path / "out") == before


# --- prepared data in a training run ------------------------------------------------------


def test_training_refuses_a_tokenizer_or_vocab_that_does_not_match(tmp_path, tok_path):
    from jaxlm.data.dataset import prepare_corpus

    write_corpus(tmp_path / "in")
    prepare([str(tmp_path / "in" / "*")], tok_path, tmp_path / "out", progress=False)
    base = ["model.vocab_size=320", f"data.corpus={tmp_path / 'out'}", "train.batch_size=4"]
    corpus = prepare_corpus(load_config(None, base), tmp_path / "run")
    assert corpus.tokenizer.sha256 == load_tokenizer(tok_path).sha256  # from the manifest
    assert len(corpus.train_docs) + len(corpus.val_docs) == 21 and corpus.streams == 4
    other_tok = tmp_path / "other.model"
    train_tokenizer(["completely different words here"] * 20, str(other_tok), vocab_size=320)
    with pytest.raises(ConfigError, match="not with the run's tokenizer"):
        prepare_corpus(load_config(None, [*base, f"data.tokenizer={other_tok}"]), tmp_path)
    with pytest.raises(ConfigError, match="vocab size 320"):
        prepare_corpus(load_config(None, [*base, "model.vocab_size=512"]), tmp_path)
    mix = f"data.sources=[{{path: {tmp_path / 'out'}, weight: 2}}, {{path: {tmp_path}}}]"
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        prepare_corpus(load_config(None, [*base, mix]), tmp_path)


@pytest.mark.slow
def test_two_real_processes_on_prepared_data_match_one(tmp_path, tok_path):
    """`jaxlm launch local` with 2 processes x 2 devices == 1 process x 4 devices, bit for bit."""
    import os
    import socket
    import subprocess
    import sys

    write_corpus(tmp_path / "in")
    prepare([str(tmp_path / "in" / "*")], tok_path, tmp_path / "data", progress=False)
    overrides = ["model.vocab_size=320", "model.d_model=32", "model.n_layers=1"]
    overrides += ["model.n_heads=4", "model.max_seq_len=32", "data.seq_len=32", "train.steps=3"]
    overrides += ["train.batch_size=8", "train.log_every=1", "train.eval_every=0"]
    overrides += ["train.sample_tokens=0", "optimizer.warmup_steps=1", "mesh.data=1"]
    overrides += ["mesh.fsdp=2", "mesh.tensor=2", f"data.corpus={tmp_path / 'data'}"]
    fast = FAST_XLA
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": fast}
    cli_cmd = [sys.executable, "-m", "jaxlm.cli"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = subprocess.run(
        [*cli_cmd, "train", "-w", str(tmp_path / "one"), "--no-progress", *overrides],
        env={**env, "XLA_FLAGS": f"{fast} --xla_force_host_platform_device_count=4"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [*cli_cmd, "launch", "local", "-w", str(tmp_path / "two"), "--nodes", "2"]
        + ["--cpu-devices", "2", "--port", str(port), *overrides],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]

    assert len(losses("one")) == 3 and losses("one") == losses("two")
