"""`jaxlm bench train`: the JSON record, the table row and the printed result."""

from __future__ import annotations

import json

import pytest

TINY = [
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.vocab_size=300",
    "model.max_seq_len=16",
    "data.seq_len=16",
    "train.batch_size=2",
]


def test_bench_train_writes_json_and_table(tmp_path, capsys):
    from jaxlm.bench.train import JSON_KEYS
    from jaxlm.cli import main

    out, table = tmp_path / "r.json", tmp_path / "t.md"
    argv = ["bench", "train", *TINY, "--steps", "2", "--warmup", "1", "--json", str(out)]
    profile = tmp_path / "trace"
    assert main(argv + ["--table", str(table), "--profile", str(profile)]) == 0
    assert list(profile.rglob("*.xplane.pb"))  # a trace of the timed steps
    r = json.loads(out.read_text())
    assert set(JSON_KEYS) <= set(r)
    assert len(r["step_s"]) == 2 and r["tokens_per_step"] == 32
    assert r["tokens_per_sec"] == pytest.approx(32 / r["median_step_s"])
    assert 0 < r["mfu"] < 1.5 and r["peak_flops_per_device"] > 0 and r["compile_s"] > 0
    assert r["memory"] is None or r["memory"]["peak"] > 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "float32" in rows[0]
    assert json.loads(capsys.readouterr().out)["mfu"] == pytest.approx(r["mfu"])
