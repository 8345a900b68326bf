"""`jaxlm bench data`: the throughput table of preparation and the pipeline."""

from __future__ import annotations

import json

from jaxlm import cli


def test_bench_data_writes_a_table(tmp_path, capsys):
    out = tmp_path / "data.md"
    argv = ["bench", "data", "--batches", "3", "--warmup", "1", "--copies", "1", "--workers", "1"]
    argv += ["--train-tokens-per-s", "1000", "--markdown", str(out), "train.batch_size=8"]
    argv += ["model.vocab_size=512", "data.seq_len=32", "model.max_seq_len=32"]
    assert cli.main(argv) == 0
    table = out.read_text()
    for row in ("data prepare, 1 worker(s)", "pipeline: prepared shards", "train step consumes"):
        assert row in table
    assert "x what the train step needs from it" in table


def test_bench_data_at_scale_writes_a_table_and_results(tmp_path, capsys):
    out, results = tmp_path / "scale.md", tmp_path / "scale.json"
    argv = ["bench", "data", "--documents", "2e3", "--batches", "2", "--warmup", "0"]
    argv += ["--pipeline-workers", "0", "--markdown", str(out), "--json", str(results)]
    argv += [
        "train.batch_size=4",
        "model.vocab_size=512",
        "data.seq_len=32",
        "model.max_seq_len=32",
    ]
    assert cli.main(argv) == 0
    table = out.read_text()
    assert "host peak RSS growth (MiB)" in table and "| 2e+03 | 0 |" in table
    saved = json.loads(results.read_text())
    (row,) = saved["results"]
    assert row["documents"] == 2000 and row["tokens/s"] > 0 and row["first_batch_s"] > 0
    assert "grain" in saved["environment"]


def test_scale_sizes_step_by_100x_up_to_the_number_asked_for():
    from jaxlm.bench.data import scale_sizes

    assert scale_sizes(10**9) == [10**6, 10**8, 10**9]
    assert scale_sizes(10**6) == [10**6]
    assert scale_sizes(500) == [500]
