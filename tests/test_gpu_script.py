"""benchmarks/gpu.sh: --dry-run lists every step of the GPU check, and a machine without a GPU
gets one sentence and a non-zero exit instead of a half-run benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import assert_one_sentence

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_lists_every_step_and_the_report_it_writes():
    assert os.access(SCRIPT, os.X_OK)
    proc = run_script("--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "benchmarks/gpu-<device>.md" in out
    assert "-m gpu tests/test_gpu.py" in out
    assert "bench attention --impls xla,cudnn,pallas" in out
    assert "--seq 1024,2048,4096,8192,16384 --head-dim 64,128" in out
    assert "bench train --config configs/gpt2-small.yaml" in out
    assert out.count("train.steps=100") == 2 and "model.dtype=bfloat16" in out
    assert "loss_falls.py" in out and "triton_sweep.py" in out
    limits = [int(line.split("(at most ")[1].split("s)")[0]) for line in out.splitlines()[1:]]
    assert len(limits) == 6 and sum(limits) <= 600  # the whole check fits in 10 minutes


def test_without_a_gpu_it_stops_with_one_sentence():
    # JAX_PLATFORMS=cpu hides any GPU from JAX, so this holds on a GPU machine too.
    before = sorted(SCRIPT.parent.iterdir())
    proc = run_script(JAX_PLATFORMS="cpu")
    assert proc.returncode == 1
    assert proc.stdout == ""
    message = proc.stderr.strip()
    assert "needs an NVIDIA GPU" in message and "--dry-run" in message
    assert_one_sentence(message)
    assert sorted(SCRIPT.parent.iterdir()) == before  # nothing half-written


def test_an_unknown_option_is_refused():
    assert run_script("--fast").returncode == 2
