"""`jaxlm bench data`: the throughput table of preparation and the pipeline."""

from __future__ import annotations

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
