"""`jaxlm bench attention`: the FLOP convention, result rows, outputs, the memory claim."""

from __future__ import annotations

import importlib.util
import json

import pytest

from jaxlm.bench import attention as bench
from jaxlm.bench import report
from jaxlm.cli import main


def test_flops_follow_the_flash_attention_convention():
    case = bench.Case("pallas", "fwd", 2, 8, 8, 1024, 64, False, "bfloat16")
    assert bench.attention_flops(case) == 4 * 2 * 1024**2 * 8 * 64
    causal = bench.Case("pallas", "fwd", 2, 8, 8, 1024, 64, True, "bfloat16")
    assert bench.attention_flops(causal) == bench.attention_flops(case) / 2
    both = bench.Case("pallas", "fwd+bwd", 2, 8, 8, 1024, 64, True, "bfloat16")
    assert bench.attention_flops(both) == 3.5 * bench.attention_flops(causal)  # bwd = 2.5 fwd


def test_sweep_measures_each_impl_and_mode(tmp_path):
    rows = bench.sweep(
        ["pallas", "reference", "cudnn"], ["fwd", "fwd+bwd"], [1], [2], [1], [32], [16],
        [True], ["float32"], iters=2,
    )  # fmt: skip
    assert [(r["impl"], r["mode"]) for r in rows] == [
        (i, m) for i in ("pallas", "reference", "cudnn") for m in ("fwd", "fwd+bwd")
    ]
    for row in rows[:4]:
        assert row["median_ms"] > 0 and row["tflops"] > 0 and row["compile_s"] > 0
        assert row["temp_bytes"] is not None and row["max_abs_error"] < 1e-5
        expected = bench.attention_flops(
            bench.Case(**{k: row[k] for k in bench.Case.__annotations__})
        )
        assert row["tflops"] == pytest.approx(expected / row["median_ms"] / 1e9)
    assert all("GPU" in r["skipped"] for r in rows[4:])  # cuDNN on a CPU machine

    env = report.environment()
    assert {"device", "platform", "jax", "date", "pallas_mode"} <= set(env)
    report.write_results(tmp_path / "r.json", rows, env)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["environment"]["jax"] == env["jax"] and len(saved["results"]) == 6
    text = report.markdown("t", env, bench.table(rows))
    assert text.count("\n| pallas |") == 2 and "cuDNN needs a GPU" in text
    wrote = bench.write_plot(tmp_path / "p.png", rows, env)
    assert wrote == (importlib.util.find_spec("matplotlib") is not None)
    assert (tmp_path / "p.png").exists() == wrote


def test_kernel_temp_memory_at_8k_is_under_a_tenth_of_the_reference():
    """Compiled (not run) at S=8192: the flash kernel never holds the S x S scores."""
    temp = {}
    for impl in ("reference", "pallas"):
        case = bench.Case(impl, "fwd+bwd", 1, 2, 2, 8192, 64, True, "bfloat16")
        temp[impl] = bench.measure(case, compile_only=True)["temp_bytes"]
    assert temp["reference"] > 2 * 8192**2 * 2  # at least one bf16 score matrix per head
    assert temp["pallas"] <= temp["reference"] / 10, temp


def test_cli_bench_attention_writes_results(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "attention", "--impls", "pallas", "--mode", "fwd", "--seq", "16"]
    argv += ["--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--iters", "1"]
    argv += ["--block-q", "8", "--json", str(out), "--markdown", str(tmp_path / "b.md")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| pallas | fwd | 1 | 2 | 1 | 16 | 16 | true | float32 |" in printed
    assert json.loads(out.read_text())["results"][0]["tflops"] > 0
    assert "pallas_mode: interpret" in (tmp_path / "b.md").read_text()


def test_cli_bench_refuses_unknown_impl_in_one_line(capsys):
    assert main(["bench", "attention", "--impls", "flash9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "flash9" in err and "pallas" in err
