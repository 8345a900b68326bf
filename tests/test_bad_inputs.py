"""Bad inputs to every command end in one sentence and the right exit code, never a traceback.

Each case runs `jaxlm ARGV` in this process and checks: the exit code (2 for a bad input, 1
for a path the machine can't write), no traceback, a last line that is one sentence, and
that the sentence names the offending value or file. Bad inputs are refused before anything
compiles, so each case takes milliseconds; the cases that need a trained run or a tokenizer
live in test_bad_inputs_run.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY_MODEL, assert_one_sentence

from jaxlm import cli

# A directory that not even root may create entries in (sysfs refuses them).
UNWRITABLE = "/sys/jaxlm-no-such-dir"
needs_sys = pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a read-only /sys")

# Bytes that are not UTF-8: Latin-1 text whose first bad byte is at offset 7.
LATIN1 = "Caf\u00e9 au lait, d\u00e9j\u00e0 vu.\n".encode("latin-1")
LATIN1 = b"ok tea " + LATIN1
BINARY = bytes(range(256)) * 64


def write_inputs(root: Path) -> dict[str, str]:
    """The bad files the cases refer to, by placeholder name."""
    files = {
        "latin1.txt": LATIN1 * 40,
        "binary.bin": BINARY,
        "afile": b"just a file\n",
        "dup_key.yaml": b"model:\n  n_layers: 2\n  n_layers: 4\n",
        "dup_section.yaml": b"model:\n  n_layers: 2\ntrain:\n  steps: 5\nmodel:\n  d_model: 64\n",
        "dup_nested.yaml": b"data:\n  sources:\n    - path: a\n      path: b\n",
        "bad.yaml": b"model:\n  n_layers: [2\n",
        "list.yaml": b"- model\n- train\n",
        "tagged.yaml": b"model: !!python/object/apply:os.system ['true']\n",
        "ok.txt": b"Some plain text to train on.\n" * 50,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {n.replace(".", "_"): str(root / n) for n in files} | {"tmp": str(root)}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `jaxlm ARGV`; argparse's own exits count too."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def check_refusal(argv, code, names, avoid, capsys) -> str:
    """Run a case and check everything the module docstring promises; returns the message."""
    got, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    assert got == code, f"exit {got}, wanted {code}: {err}"
    line = err.strip().splitlines()[-1]
    if "error:" in line:
        assert_one_sentence(line.split("error: ", 1)[1])
    for word in names:
        assert word in line, f"{word!r} not named in: {line}"
    for word in avoid:
        assert word not in line, f"{word!r} should not be in: {line}"
    return line


TRAIN = ["--no-progress", *TINY_MODEL, "train.steps=2", "train.eval_every=0"]
TRAIN += ["train.sample_tokens=0", "optimizer.warmup_steps=0", "train.batch_size=2"]


def case(name, argv, code, names, avoid=(), marks=()):
    """A table row: argv, the exit code, words the message names, words it must not say."""
    return pytest.param(argv, code, names, avoid, id=name, marks=marks)


CASES = [
    # config files
    case("config-dir", ["config", "-c", "{tmp}"], 2, ["{tmp}", "directory"], ["does not exist"]),
    case("config-missing", ["config", "-c", "{tmp}/no.yaml"], 2, ["no.yaml", "does not exist"], []),
    case("config-binary", ["config", "-c", "{binary_bin}"], 2, ["binary.bin", "UTF-8", "byte 128"], []),
    case("config-dup-key", ["config", "-c", "{dup_key_yaml}"], 2, ["n_layers", "line 3"], []),
    case("config-dup-section", ["config", "-c", "{dup_section_yaml}"], 2, ["'model'", "line 5"], []),
    case("config-dup-nested", ["config", "-c", "{dup_nested_yaml}"], 2, ["'path'", "line 4"], []),
    case("config-bad-yaml", ["config", "-c", "{bad_yaml}"], 2, ["bad.yaml", "line"], []),
    case("config-list", ["config", "-c", "{list_yaml}"], 2, ["list.yaml", "mapping"], []),
    case("config-python-tag", ["config", "-c", "{tagged_yaml}"], 2, ["tagged.yaml", "YAML"], []),
    case("train-config-dir", ["train", "-w", "{tmp}/w", "-c", "{tmp}"], 2, ["directory"], ["exist"]),
    # config values
    case("steps-negative", ["config", "train.steps=-3"], 2, ["train.steps=-3"], ["warmup"]),
    case("train-steps-negative", ["train", "-w", "{tmp}/w", "train.steps=-3"], 2, ["train.steps"],
     ["warmup"]),
    case("steps-zero", ["config", "train.steps=0"], 2, ["train.steps=0"], ["warmup"]),
    case("override-no-equals", ["config", "model.n_layers"], 2, ["model.n_layers"], []),
    case("override-no-section", ["config", "n_layers=2"], 2, ["n_layers"], []),
    case("unknown-section", ["config", "foo.bar=1"], 2, ["foo"], []),
    case("unknown-key", ["config", "model.layers=2"], 2, ["model.layers"], []),
    case("not-an-int", ["config", "model.n_layers=two"], 2, ["model.n_layers", "two"], []),
    case("not-a-bool", ["config", "model.scan_layers=maybe"], 2, ["model.scan_layers"], []),
    case("unknown-family", ["config", "model.family=bert"], 2, ["bert"], []),
    case("dropout-range", ["config", "model.dropout=1.5"], 2, ["model.dropout=1.5"], []),
    case("batch-zero", ["config", "train.batch_size=0"], 2, ["train.batch_size=0"], []),
    case("lr-negative", ["config", "optimizer.lr=-1"], 2, ["optimizer.lr=-1"], []),
    case("mesh-zero", ["config", "mesh.data=0"], 2, ["mesh.data=0"], []),
    case("seq-too-long", ["config", "data.seq_len=99999"], 2, ["data.seq_len=99999"], []),
    case("nan-policy", ["config", "train.nan_policy=explode"], 2, ["explode"], []),
    case("warmup-too-long", ["config", "train.steps=5", "optimizer.warmup_steps=9"], 2,
     ["optimizer.warmup_steps=9"], []),
    # train: the workdir and the corpus
    case("train-workdir-file", ["train", "-w", "{afile}", *TRAIN], 2, ["afile", "file"], []),
    case("train-workdir-under-file", ["train", "-w", "{afile}/run", *TRAIN], 2, ["afile"], []),
    case("train-workdir-unwritable", ["train", "-w", f"{UNWRITABLE}/run", *TRAIN], 1,
                 [UNWRITABLE], [], marks=needs_sys),
    case("train-corpus-latin1", ["train", "-w", "{tmp}/w2", *TRAIN, "data.corpus={latin1_txt}"], 2,
     ["latin1.txt", "byte 10", "UTF-8"], []),
    case("train-corpus-missing", ["train", "-w", "{tmp}/w3", *TRAIN, "data.corpus={tmp}/no/*.txt"],
     2, ["no/*.txt"], []),
    # data prepare: options and paths checked before the tokenizer loads
    case("prepare-shard-mb", ["data", "prepare", "--input", "{ok_txt}", "--tokenizer", "{afile}",
     "--output", "{tmp}/p1", "--shard-mb", "-1"], 2, ["--shard-mb", "-1"], []),
    case("prepare-workers", ["data", "prepare", "--input", "{ok_txt}", "--tokenizer", "{afile}",
     "--output", "{tmp}/p2", "--workers", "0"], 2, ["--workers", "0"], []),
    case("prepare-output-file", ["data", "prepare", "--input", "{ok_txt}", "--tokenizer", "{afile}",
     "--output", "{afile}"], 2, ["afile"], []),
    case("prepare-output-unwritable", ["data", "prepare", "--input", "{ok_txt}",
                 "--tokenizer", "{afile}", "--output", f"{UNWRITABLE}/p"], 1, [UNWRITABLE], [],
                 marks=needs_sys),
    case("prepare-input-missing", ["data", "prepare", "--input", "{tmp}/none.txt", "--tokenizer",
     "{afile}", "--output", "{tmp}/p3"], 2, ["none.txt"], []),
    case("prepare-tokenizer-missing", ["data", "prepare", "--input", "{ok_txt}", "--tokenizer",
     "{tmp}/no.model", "--output", "{tmp}/p4"], 2, ["no.model"], []),
    case("prepare-tokenizer-garbage", ["data", "prepare", "--input", "{ok_txt}", "--tokenizer",
     "{binary_bin}", "--output", "{tmp}/p5"], 2, ["binary.bin"], []),
    # tokenizer train
    case("tokenizer-binary-input", ["tokenizer", "train", "--input", "{binary_bin}", "--vocab-size",
     "300", "--output", "{tmp}/t1"], 2, ["binary.bin"], ["vocabulary size"]),
    case("tokenizer-latin1-input", ["tokenizer", "train", "--input", "{latin1_txt}", "--vocab-size",
     "300", "--output", "{tmp}/t2"], 2, ["latin1.txt", "byte 10"], ["vocabulary size"]),
    case("tokenizer-output-unwritable", ["tokenizer", "train", "--input", "{ok_txt}",
                 "--vocab-size", "300", "--output", f"{UNWRITABLE}/tok"], 1, [UNWRITABLE], [],
                 marks=needs_sys),
    case("tokenizer-output-under-file", ["tokenizer", "train", "--input", "{ok_txt}",
     "--vocab-size", "300", "--output", "{afile}/tok"], 2, ["afile"], []),
    case("tokenizer-vocab-small", ["tokenizer", "train", "--input", "{ok_txt}", "--vocab-size", "10",
     "--output", "{tmp}/t3"], 2, ["--vocab-size=10"], []),
    case("tokenizer-max-sentences", ["tokenizer", "train", "--input", "{ok_txt}", "--vocab-size",
     "300", "--max-sentences", "-5", "--output", "{tmp}/t4"], 2, ["--max-sentences=-5"], []),
    case("tokenizer-threads", ["tokenizer", "train", "--input", "{ok_txt}", "--vocab-size", "300",
     "--threads", "0", "--output", "{tmp}/t5"], 2, ["--threads", "0"], []),
    case("tokenizer-input-missing", ["tokenizer", "train", "--input", "{tmp}/none.txt",
     "--vocab-size", "300", "--output", "{tmp}/t6"], 2, ["none.txt"], []),
    # plan
    case("plan-devices-zero", ["plan", "--devices", "0"], 2, ["--devices", "0"], []),
    case("plan-devices-negative", ["plan", "--devices", "-4"], 2, ["--devices", "-4"], []),
    case("plan-slices-zero", ["plan", "--slices", "0", "--topology", "v5e:2x2"], 2, ["--slices"], []),
    case("plan-memory-negative", ["plan", "--devices", "1", "--device-memory-gb", "-1"], 2,
     ["--device-memory-gb"], []),
    case("plan-topology", ["plan", "--topology", "v9z:banana"], 2, ["v9z:banana"], []),
    # plot
    case("plot-no-metrics", ["plot", "{tmp}", "-o", "{tmp}/loss.png"], 2, ["metrics.jsonl"], []),
    case("plot-output-dir", ["plot", "{tmp}", "-o", "{tmp}"], 2, ["{tmp}", "directory"], []),
    case("plot-output-under-file", ["plot", "{tmp}", "-o", "{afile}/loss.png"], 2, ["afile"], []),
    case("plot-output-unwritable", ["plot", "{tmp}", "-o", f"{UNWRITABLE}/loss.png"], 1,
                 [UNWRITABLE], [], marks=needs_sys),
    # bench and launch: options and output files checked before anything runs
    case("bench-attention-iters", ["bench", "attention", "--iters", "0"], 2, ["--iters", "0"], []),
    case("bench-attention-json", ["bench", "attention", "--json", f"{UNWRITABLE}/a.json"],
                 1, [UNWRITABLE], [], marks=needs_sys),
    case("bench-train-steps", ["bench", "train", "--steps", "0"], 2, ["--steps", "0"], []),
    case("bench-train-json-dir", ["bench", "train", "--json", "{tmp}"], 2, ["{tmp}"], []),
    case("bench-data-batches", ["bench", "data", "--batches", "0"], 2, ["--batches", "0"], []),
    case("bench-decode-iters", ["bench", "decode", "--iters", "0"], 2, ["--iters", "0"], []),
    case("bench-decode-markdown", ["bench", "decode", "--markdown", "{afile}/x.md"], 2, ["afile"],
     []),
    case("launch-nodes-zero", ["launch", "local", "-w", "{tmp}/l", "--nodes", "0", "--dry-run"], 2,
     ["--nodes", "0"], []),
    case("launch-config-binary", ["launch", "local", "-w", "{tmp}/l", "-c", "{binary_bin}",
     "--dry-run"], 2, ["binary.bin"], []),
    # convert: a missing source, an output that can't be a new directory
    case("from-hf-missing", ["convert", "from-hf", "{tmp}/nohf", "-o", "{tmp}/c1"], 2, ["nohf"], []),
    case("to-hf-output-file", ["convert", "to-hf", "{tmp}", "-o", "{afile}"], 2, ["afile"], []),
    case("to-hf-missing", ["convert", "to-hf", "{tmp}/norun", "-o", "{tmp}/c2"], 2, ["norun"], []),
    case("to-hf-shard-size", ["convert", "to-hf", "{tmp}", "-o", "{tmp}/c3", "--max-shard-gb", "0"],
     2, ["--max-shard-gb"], []),
]  # fmt: skip


def _fill(values, files):
    return [v.format(**files) for v in values]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("argv, code, names, avoid", CASES)
def test_bad_input_is_refused_in_one_sentence(argv, code, names, avoid, inputs, capsys):
    check_refusal(_fill(argv, inputs), code, _fill(names, inputs), avoid, capsys)
