"""`jaxlm plot`: reading runs' metrics.jsonl and drawing their loss curves."""

from __future__ import annotations

import json

import pytest


def _write_run(d, losses, evals):
    d.mkdir()
    lines = [{"step": i + 1, "split": "train", "loss": v} for i, v in enumerate(losses)]
    lines += [{"step": s, "split": "eval", "loss": v} for s, v in evals]
    lines += [{"step": 2, "split": "perf", "tokens_per_sec": 5.0}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken")
    (d / "config.yaml").write_text("train:\n  batch_size: 4\ndata:\n  seq_len: 8\n")


def test_plot_writes_png_of_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from jaxlm.bench.plot import read_run
    from jaxlm.cli import main

    _write_run(tmp_path / "a", [5.0, 4.0, 3.5], [(0, 5.5), (3, 3.6)])
    _write_run(tmp_path / "b", [5.1, 4.2], [])
    run = read_run(tmp_path / "a")
    assert run.train == [(1, 5.0), (2, 4.0), (3, 3.5)] and run.eval == [(0, 5.5), (3, 3.6)]
    assert run.tokens_per_step == 32
    png = tmp_path / "out" / "loss.png"
    argv = ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(png), "--x", "tokens"]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "missing"), "-o", str(png)]) == 2


def test_moe_load_plot_reads_each_experts_share_and_refuses_a_dense_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from jaxlm.bench.plot import read_moe_load
    from jaxlm.cli import main

    moe, dense = tmp_path / "moe", tmp_path / "dense"
    _write_run(dense, [5.0, 4.0], [])
    moe.mkdir()
    shares = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
    lines = [
        {"step": 10 * (i + 1), "split": "train", "loss": 4.0, **{f"moe_load_{e}": v for e, v in enumerate(row)}}
        for i, row in enumerate(shares)
    ]  # fmt: skip
    lines.append({"step": 20, "split": "eval", "loss": 4.1})
    (moe / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (moe / "config.yaml").write_text("model:\n  moe_experts: 4\n")
    assert read_moe_load(moe) == ([10, 20], shares)
    png = tmp_path / "load.png"
    assert main(["plot", "--moe-load", str(moe), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["plot", "--moe-load", str(dense), "-o", str(png)]) == 2
    err = capsys.readouterr().err
    assert "has no moe_load_* records" in err and err.count("\n") == 1
