"""`jaxlm train` with data.streaming: raw JSONL tokenized on the fly, a content-hash split that
never mixes train and validation, and a resume that repeats the run bit for bit."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import pytest
from conftest import FAST_XLA, TINY_TRAIN, assert_one_sentence, cli_error, free_port, paragraph

from jaxlm import cli
from jaxlm.data.raw_stream import RawDocuments
from jaxlm.data.streamed import HeldOut, ProcessBound
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.errors import ConfigError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, str]:
    """Three JSONL files of short documents, and a tokenizer; returns (directory, tokenizer)."""
    root = tmp_path_factory.mktemp("stream")
    rng = random.Random(3)
    train_tokenizer([paragraph(rng, 30) for _ in range(50)], str(root / "spm.model"), 320)
    for k in range(3):
        rows = [{"text": f"File {k} doc {i}. " + paragraph(rng, 3)} for i in range(8)]
        (root / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, str(root / "spm.model")


def test_the_split_sends_each_document_to_exactly_one_side(corpus):
    root, tok = corpus
    raw = RawDocuments([str(root / "*.jsonl")], tok, repeat=False)
    every = [d.tolist() for d in raw]
    train = [d.tolist() for d in HeldOut(raw, 0.3, 0, validation=False)]
    val = [d.tolist() for d in HeldOut(raw, 0.3, 0, validation=True)]
    assert train and val and sorted(train + val) == sorted(every)
    # Keyed by content, not position: the same split whatever the file order.
    shuffled = HeldOut(RawDocuments([str(root / "*.jsonl")], tok, seed=5), 0.3, 0, True)
    it = iter(shuffled)
    assert sorted(next(it).tolist() for _ in range(len(val))) == sorted(val)


def test_a_streamed_position_refuses_another_process_count():
    source = grain.MapDataset.range(10).to_iter_dataset()
    it = iter(ProcessBound(source, 0, 1))
    next(it)
    state = it.get_state()
    other = iter(ProcessBound(source, 0, 2))
    with pytest.raises(ConfigError) as e:
        other.set_state(state)
    assert_one_sentence(str(e.value))
    again = iter(ProcessBound(source, 0, 1))
    again.set_state(state)
    assert next(again) == next(it) == 1


def test_train_streams_jsonl_and_resumes_bit_for_bit(corpus, tmp_path, capsys):
    root, tok = corpus
    base = [
        *TINY_TRAIN,
        "model.vocab_size=320",
        "data.streaming=true",
        f"data.corpus={root / '*.jsonl'}",
        f"data.tokenizer={tok}",
        "data.validation_fraction=0.3",
        "train.steps=4",
    ]

    def train(workdir: Path) -> dict:
        capsys.readouterr()
        assert cli.main(["train", "-w", str(workdir), "--no-progress", *base]) == 0, (
            capsys.readouterr().err[-2000:]
        )
        return json.loads(capsys.readouterr().err.strip().splitlines()[-1])

    def losses(workdir: Path) -> dict[int, tuple[float, float]]:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        rows = [r for r in map(json.loads, lines) if r["split"] == "train"]
        assert len({r["step"] for r in rows}) == len(rows), "a step logged twice"
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}

    summary = train(tmp_path / "whole")
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4]
    assert summary["final_eval_loss"] is not None  # held-out documents made an eval batch
    # A run killed after its step-2 checkpoint: the same command resumes it from there.
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "4")
    assert train(tmp_path / "killed")["start_step"] == 2
    assert losses(tmp_path / "killed") == whole


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ([], "data.tokenizer"),  # nothing is trained on the fly
        (["data.tokenizer=T", "data.corpus=builtin"], "data.corpus"),
        (["data.tokenizer=T", "train.eval_batches=0"], "train.eval_batches"),
        (["data.tokenizer=T", "data.workers=2"], "data.workers"),
        (["data.tokenizer=T", "data.streams=2"], "data.streams"),
    ],
)
def test_a_streaming_config_it_cannot_run_is_one_sentence(corpus, tmp_path, capsys, extra, key):
    root, _ = corpus
    argv = ["train", "-w", str(tmp_path / "run"), *TINY_TRAIN, "data.streaming=true"]
    err = cli_error([*argv, f"data.corpus={root / '*.jsonl'}", *extra], capsys)
    assert key in err
    assert_one_sentence(err.removeprefix("error: "))


@pytest.mark.slow  # two jobs of two processes each: about a minute of start-up
def test_two_processes_stream_their_own_files_and_resume_bit_for_bit(corpus, tmp_path):
    """`jaxlm launch local --nodes 2`: each process streams its own files, packs its rows of
    the batch, and a run restarted from its step-2 checkpoint repeats steps 3-4 exactly; the
    same position on one process is refused in one sentence."""
    root, tok = corpus
    overrides = [
        *TINY_TRAIN,
        "model.vocab_size=320",
        "data.streaming=true",
        f"data.corpus={root / '*.jsonl'}",
        f"data.tokenizer={tok}",
        "data.validation_fraction=0.3",
        "train.steps=4",
        "mesh.data=2",
        "mesh.fsdp=1",
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))},
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": FAST_XLA,
    }

    def launch(workdir: Path, nodes: int) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "jaxlm.cli", "launch", "local", "--workdir", str(workdir)]
        argv += ["--nodes", str(nodes), "--cpu-devices", str(2 // nodes)]
        argv += ["--port", str(free_port()), *overrides]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)

    def losses(workdir: Path) -> dict[int, float]:
        rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    first = launch(tmp_path / "whole", 2)
    assert first.returncode == 0, first.stderr[-4000:]
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4]
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "4")
    again = launch(tmp_path / "killed", 2)
    assert again.returncode == 0, again.stderr[-4000:]
    assert losses(tmp_path / "killed") == whole
    shutil.rmtree(tmp_path / "whole" / "checkpoints" / "4")
    one = launch(tmp_path / "whole", 1)
    assert one.returncode != 0
    assert "streamed run" in one.stderr and "Traceback" not in one.stderr, one.stderr[-3000:]
