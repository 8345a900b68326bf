"""Bad inputs to the commands that read a trained run (eval, generate, export, finetune,
convert), a double Ctrl-C during training, and JAXLM_DEBUG: each ends in one sentence and the
right exit code, never a traceback. All cases share the session's `pretrained` run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_TRAIN, fake_devices_env
from test_bad_inputs import LATIN1, UNWRITABLE, check_refusal, needs_sys, write_inputs

from jaxlm import cli
from jaxlm.errors import ConfigError


def case(name, argv, code, names, avoid=(), marks=()):
    """A table row: argv, the exit code, words the message names, words it must not say."""
    return pytest.param(argv, code, names, avoid, id=name, marks=marks)


CASES = [
    # eval: inputs and -o are checked before the checkpoint is evaluated
    case("eval-data-latin1", ["eval", "-w", "{run}", "--data", "{latin1_txt}"], 2,
         ["latin1.txt", "byte 10", "UTF-8"]),
    case("eval-data-missing", ["eval", "-w", "{run}", "--data", "{tmp}/no.txt"], 2, ["no.txt"]),
    case("eval-choices-latin1", ["eval", "-w", "{run}", "--multiple-choice", "{latin1_txt}"], 2,
         ["latin1.txt", "byte 10"]),
    case("eval-output-dir", ["eval", "-w", "{run}", "-o", "{tmp}"], 2, ["{tmp}", "directory"]),
    case("eval-output-under-file", ["eval", "-w", "{run}", "-o", "{afile}/e.json"], 2, ["afile"]),
    case("eval-output-unwritable", ["eval", "-w", "{run}", "-o", f"{UNWRITABLE}/e.json"], 1,
         [UNWRITABLE], marks=needs_sys),
    case("eval-batch-size", ["eval", "-w", "{run}", "--batch-size", "0"], 2, ["--batch-size"]),
    case("eval-no-checkpoint", ["eval"], 2, ["--checkpoint"]),
    case("eval-checkpoint-missing", ["eval", "-w", "{tmp}/norun"], 2, ["norun"]),
    case("eval-step-missing", ["eval", "-w", "{run}", "--step", "999"], 2, ["999"]),
    # generate
    case("generate-prompts-latin1", ["generate", "-w", "{run}", "--prompts-file", "{latin1_txt}"],
         2, ["latin1.txt", "byte 10"]),
    case("generate-temperature", ["generate", "-w", "{run}", "--temperature", "-1"], 2, ["-1"]),
    case("generate-tokens", ["generate", "-w", "{run}", "--max-new-tokens", "0"], 2,
         ["--max-new-tokens"]),
    case("generate-output-unwritable", ["generate", "-w", "{run}", "-o", f"{UNWRITABLE}/g.jsonl"],
         1, [UNWRITABLE], marks=needs_sys),
    # export
    case("export-output-file", ["export", "-w", "{run}", "-o", "{afile}"], 2, ["afile"]),
    case("export-output-under-file", ["export", "-w", "{run}", "-o", "{afile}/exp"], 2, ["afile"]),
    case("export-output-unwritable", ["export", "-w", "{run}", "-o", f"{UNWRITABLE}/exp"], 1,
         [UNWRITABLE], marks=needs_sys),
    case("export-not-a-run", ["export", "-w", "{tmp}", "-o", "{tmp}/exp"], 2, ["config.yaml"]),
    case("export-step-missing", ["export", "-w", "{run}", "-o", "{tmp}/e2", "--step", "999"], 2,
         ["999"]),
    # finetune
    case("classify-tsv-latin1", ["finetune", "classify", "--checkpoint", "{run}", "--train",
         "{latin1_tsv}", "-w", "{tmp}/c1"], 2, ["latin1.tsv", "byte 10"]),
    case("classify-workdir-file", ["finetune", "classify", "--checkpoint", "{run}", "--train",
         "{good_tsv}", "-w", "{afile}"], 2, ["afile"]),
    case("classify-epochs", ["finetune", "classify", "--checkpoint", "{run}", "--train",
         "{good_tsv}", "-w", "{tmp}/c2", "--epochs", "0"], 2, ["--epochs=0"]),
    case("classify-fraction", ["finetune", "classify", "--checkpoint", "{run}", "--train",
         "{good_tsv}", "-w", "{tmp}/c3", "--validation-fraction", "1.5"], 2, ["1.5"]),
    case("predict-latin1", ["finetune", "predict", "-w", "{run}", "--input", "{latin1_txt}"], 2,
         ["latin1.txt", "byte 10"]),
    case("predict-not-classifier", ["finetune", "predict", "-w", "{run}", "--input", "{ok_txt}"],
         2, ["classifier.json"]),
    case("finetune-lm-workdir-file", ["finetune", "lm", "--checkpoint", "{run}", "-w", "{afile}"],
         2, ["afile"]),
    case("finetune-lm-checkpoint-missing", ["finetune", "lm", "--checkpoint", "{tmp}/norun", "-w",
         "{tmp}/f1"], 2, ["norun"]),
    # convert
    case("from-hf-damaged-safetensors", ["convert", "from-hf", "{damaged_hf}", "-o", "{tmp}/h1"],
         2, ["model.safetensors"]),
    case("from-hf-output-under-file", ["convert", "from-hf", "{hf}", "-o", "{afile}/h2"], 2,
         ["afile"]),
    case("from-hf-output-unwritable", ["convert", "from-hf", "{hf}", "-o", f"{UNWRITABLE}/h3"], 1,
         [UNWRITABLE], marks=needs_sys),
    case("to-hf-output-unwritable", ["convert", "to-hf", "{run}", "-o", f"{UNWRITABLE}/h4"], 1,
         [UNWRITABLE], marks=needs_sys),
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pretrained):
    """The bad files, the pretrained run, its HF conversion and a damaged copy of that."""
    root = tmp_path_factory.mktemp("badrun")
    files = write_inputs(root)
    (root / "latin1.tsv").write_bytes(LATIN1.rstrip(b"\n") + b"\tpos\n")
    (root / "good.tsv").write_text("good\tpos\nbad\tneg\n" * 10)
    hf, damaged = root / "hf", root / "damaged_hf"
    assert cli.main(["convert", "to-hf", str(pretrained), "-o", str(hf)]) == 0
    shutil.copytree(hf, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    extra = {"latin1_tsv": root / "latin1.tsv", "good_tsv": root / "good.tsv", "hf": hf}
    extra |= {"damaged_hf": damaged, "run": pretrained}
    return files | {k: str(v) for k, v in extra.items()}


@pytest.mark.parametrize("argv, code, names, avoid", CASES)
def test_bad_input_to_a_run_is_refused_in_one_sentence(argv, code, names, avoid, inputs, capsys):
    fill = lambda values: [v.format(**inputs) for v in values]  # noqa: E731
    check_refusal(fill(argv), code, fill(names), avoid, capsys)


def test_eval_output_is_checked_before_evaluating(inputs, capsys, monkeypatch):
    from jaxlm.inference import evaluate

    def never(*args, **kwargs):
        raise AssertionError("evaluated although the output can't be written")

    monkeypatch.setattr(evaluate, "Evaluator", never)
    argv = ["eval", "-w", inputs["run"], "-o", inputs["afile"] + "/e.json"]
    check_refusal(argv, 2, ["afile"], [], capsys)


def test_jaxlm_debug_shows_the_traceback(inputs, capsys, monkeypatch):
    monkeypatch.setenv("JAXLM_DEBUG", "1")
    with pytest.raises(ConfigError, match="n_layers"):
        cli.main(["config", "-c", inputs["dup_key_yaml"]])


@pytest.mark.slow  # about 30 s: the subprocess trains its tokenizer and compiles
def test_second_sigint_during_training_exits_without_traceback(tmp_path):
    """Ctrl-C asks for a save; a second one, while that is under way, ends the run at once."""
    argv = [sys.executable, "-m", "jaxlm.cli", "train", "-w", str(tmp_path / "run")]
    argv += ["--no-progress", *TINY_TRAIN, "train.steps=100000", "checkpoint.every_steps=1"]
    env = fake_devices_env(1)
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    while ": loss " not in seen:  # a step has been logged: training is under way
        line = proc.stderr.readline()
        assert line, f"the run ended before training: {seen}"
        seen += line
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = seen + proc.communicate(timeout=120)[1]
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 130), err
    assert os.path.isdir(tmp_path / "run")
