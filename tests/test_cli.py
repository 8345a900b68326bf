"""End-to-end checks of the `jaxlm` command line: help texts, a tiny real run, bad input, the
signal handlers of `jaxlm train`, and the stop strings and streaming of `jaxlm generate`."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, cli_error

from jaxlm import cli
from jaxlm.cli import train as cli_train
from jaxlm.cli.generate import Finisher, Streamer, cut_at_stop
from jaxlm.config import load_config
from jaxlm.data.tokenizer import train_tokenizer

TINY = [
    *TINY_MODEL,
    "train.batch_size=8",
    "train.steps=30",
    "train.log_every=5",
    "train.eval_every=15",
    "train.eval_batches=2",
    "train.sample_tokens=8",
    "optimizer.lr=1e-2",
    "optimizer.warmup_steps=3",
    "checkpoint.every_steps=15",
]


def _help_lines(argv: list[str], capsys) -> list[str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_top_level_help_lists_every_command_on_one_line(capsys):
    lines = _help_lines(["--help"], capsys)
    for command in cli.commands():
        matching = [ln for ln in lines if ln.strip().startswith(command + " ")]
        assert len(matching) == 1, f"'{command}' should have exactly one help line"
        assert len(matching[0].split(None, 1)) == 2, f"'{command}' has no description"


@pytest.mark.parametrize("command", ["train", "generate", "config"])
def test_subcommand_help_gives_each_option_one_line(command, capsys):
    lines = _help_lines([command, "--help"], capsys)
    options = [ln for ln in lines if ln.startswith("  -")]
    assert options, "no options listed"
    for ln in options:
        # "  --flag ARG   description": the description sits on the same line.
        assert "  " in ln.strip(), f"option help wraps onto a second line: {ln!r}"


@pytest.mark.parametrize("kind", ["lm", "classify", "predict"])
def test_finetune_help_gives_each_option_one_line(kind, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", kind, "--help"])
    options = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  -")]
    assert len(options) >= 3
    assert all("  " in ln.strip() for ln in options), options


@pytest.mark.parametrize("direction", ["from-hf", "to-hf"])
def test_convert_help_gives_each_option_one_line(direction, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", direction, "--help"])
    assert exc.value.code == 0
    options = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  -")]
    assert len(options) >= 3
    assert all("  " in ln.strip() for ln in options), options


def test_tiny_run_writes_everything_and_learns(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--no-progress", *TINY]) == 0
    out = capsys.readouterr().out

    for name in ("config.yaml", "metrics.jsonl", "tokenizer.model", "samples.txt"):
        assert (workdir / name).is_file(), name
    assert any((workdir / "tensorboard").iterdir()), "no TensorBoard event file"
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [15, 30]

    # The saved config is the resolved one and reads back to the same config.
    assert load_config(workdir / "config.yaml") == load_config(None, TINY)

    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, 31))
    evals = {r["step"]: r["loss"] for r in records if r["split"] == "eval"}
    assert sorted(evals) == [0, 15, 30]
    assert evals[30] < evals[0] - 1.0, f"validation loss did not fall: {evals}"
    assert all("tokens_per_sec" in r for r in records if r["split"] == "perf")

    assert "--- greedy" in out and "--- sampled" in out
    assert (workdir / "samples.txt").read_text().count("ROMEO.") == 2

    # The run's newest checkpoint serves `jaxlm generate`.
    assert (
        cli.main(
            [
                "generate",
                "-w",
                str(workdir),
                "--prompt",
                "KING.",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("KING.")


def test_bad_value_fails_in_one_line_and_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "never"
    err = cli_error(["train", "-w", str(workdir), "model.n_heads=3"], capsys)
    assert "model.n_heads=3" in err and "d_model" in err
    assert not workdir.exists()


def test_missing_config_file_is_one_line(tmp_path, capsys):
    err = cli_error(["train", "-w", str(tmp_path / "r"), "-c", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml" in err


def test_mesh_larger_than_the_machine_is_refused(tmp_path, capsys):
    err = cli_error(["train", "-w", str(tmp_path / "r"), "mesh.data=4", *TINY], capsys)
    assert "4" in err and "device" in err


def test_tokenizer_model_mismatch_is_refused_before_training(tmp_path, capsys):
    text = ["To be, or not to be, that is the question."] * 200
    tok = train_tokenizer(text, str(tmp_path / "small.model"), vocab_size=300)
    workdir = tmp_path / "r"
    err = cli_error(["train", "-w", str(workdir), f"data.tokenizer={tok.path}", *TINY], capsys)
    assert "300" in err and "512" in err
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


def test_changed_model_does_not_resume_and_keeps_the_run(tmp_path, capsys):
    workdir = tmp_path / "run"
    short = [
        *TINY,
        "train.steps=4",
        "train.eval_every=0",
        "train.sample_tokens=0",
        "checkpoint.every_steps=0",
    ]
    assert cli.main(["train", "-w", str(workdir), "--no-progress", *short]) == 0
    capsys.readouterr()
    before = (workdir / "config.yaml").read_text()
    err = cli_error(["train", "-w", str(workdir), *short, "model.n_layers=2"], capsys)
    assert "model.n_layers" in err
    assert (workdir / "config.yaml").read_text() == before
    assert Path(workdir / "checkpoints" / "4").is_dir()


# --- stop signals ------------------------------------------------------------------------------


def test_first_signal_asks_to_stop_second_sigint_interrupts(capsys):
    stop, before = threading.Event(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), cli_train._stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # repeated: still just stopping
        os.kill(os.getpid(), signal.SIGINT)  # impatient: interrupt now
    assert signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err.count("saving at the next step boundary") == 1


# --- `jaxlm generate`: stop strings and streaming --------------------------------------------


class CharTokenizer:
    """Id i is the i-th letter of ALPHABET; id 0 is EOS."""

    ALPHABET = "#abcdefgh \n"
    eos_id = 0

    def decode(self, ids):
        return "".join(self.ALPHABET[i] for i in ids if i)


def test_stop_strings_and_eos_cut_the_text():
    assert cut_at_stop("abc\n\ndef", ["\n\n", "d"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    fin = Finisher(CharTokenizer(), ["ba"])
    assert fin.text([1, 2, 3, 2, 1, 4]) == ("abc", True)  # "abcbad": cut at the stop string
    assert fin.text([3, 3, 0, 1, 2, 1]) == ("cc", True)  # EOS first
    assert fin.text([3, 3, 4]) == ("ccd", False)


def test_streamer_never_prints_what_a_stop_string_removes(capsys):
    import sys

    stream = Streamer(Finisher(CharTokenizer(), ["ab"]), sys.stdout)
    ids = [3, 4, 1, 2, 5]  # "cdabe": the stop "ab" arrives split over two chunks
    ended = [stream(np.asarray([ids[:n]])) for n in (3, 4, 5)]
    stream.finish()
    assert ended == [False, True, True]
    assert capsys.readouterr().out == "cd\n"


def test_absent_tpu_is_skipped_quietly_unless_jax_platforms_is_set():
    # The test extra installs libtpu; this machine has no TPU attached.
    if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*"):
        pytest.skip("needs libtpu installed and no TPU attached")
    env = {"PATH": os.environ.get("PATH", "")}
    assert cli.skip_absent_tpu(env) and env["JAX_PLATFORMS"] == "cpu"
    chosen = {"JAX_PLATFORMS": ""}  # the user's choice, even an empty one, stands
    assert not cli.skip_absent_tpu(chosen) and chosen == {"JAX_PLATFORMS": ""}
    # A user calling jaxlm directly (no run.sh, no JAX_PLATFORMS) sees no TPU probe warnings.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    p = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "plan", "--config", "configs/tiny.yaml", "--devices", "1"],
        env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "TPU" not in p.stderr and "libtpu" not in p.stderr, p.stderr[-2000:]
