"""jaxlm.runs: run directories written by an earlier jaxlm still load, evaluate and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from jaxlm import cli
from jaxlm.runs import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "runs-ea0904f"
FAMILIES = ("llama", "gpt2", "lstm", "gru", "hawk")
# The overrides the fixture runs were trained with (see the fixtures' README.md).
OVERRIDES = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=300",
    "model.max_seq_len=16", "data.seq_len=16", "data.corpus=corpus/*.txt",
    "data.validation_fraction=0.5", "train.batch_size=2", "optimizer.warmup_steps=1",
    "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "train.log_every=1",
    "checkpoint.every_steps=0",
]  # fmt: skip


@pytest.fixture
def old_runs(tmp_path, monkeypatch):
    """A writable copy of the fixture runs, as the working directory (their corpus is relative)."""
    root = tmp_path / "runs"
    shutil.copytree(FIXTURES, root)
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_old_run_loads_and_evaluates(old_runs, family, capsys):
    run = load_run(old_runs / family)
    assert run.step == 2 and run.cfg.model.family == family
    capsys.readouterr()
    assert cli.main(["eval", "-w", family, "--data", "corpus/a.txt"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    # Two steps of training leave the loss near log(vocab); a mismatched parameter tree
    # would not load at all, a misread one would give nonsense.
    assert math.isfinite(result["loss"]) and result["loss"] < math.log(300) + 1.0


@pytest.mark.parametrize("family", ["llama", "hawk"])
def test_old_run_resumes(old_runs, family):
    argv = ["train", "-w", family, "--no-progress", f"model.family={family}", *OVERRIDES]
    assert cli.main([*argv, "train.steps=3"]) == 0
    records = [json.loads(line) for line in (old_runs / family / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == [1, 2, 3]  # steps 1-2 from the old run, step 3 after resuming at 2
    assert (old_runs / family / "checkpoints" / "3").is_dir()
