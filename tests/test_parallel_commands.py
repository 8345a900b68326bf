"""Every command that loads a model, on 2 processes x 1 device, against 1 process x 2 devices.

The run trains with `mesh.data=1 mesh.fsdp=-1`, so when it is loaded on two processes its
parameters are split between the two hosts: eval, generate, finetune classify, export and
convert to-hf must restore them sharded, compute on them where they lie and agree with one
process holding both devices. Each launch runs all the commands in one Python process per
host (one JAX start-up and one `jax.distributed` join), to keep the test short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_XLA, MEMORISED_TEXT, free_port
from safetensors.numpy import load_file
from test_parallel_distributed import _env

from jaxlm import cli
from jaxlm.runs import load_run

# Several JAX processes / compiles per test: the slow suite (pytest -m slow) runs it.
pytestmark = pytest.mark.slow

# Runs the CLI commands of argv[1] (JSON) one after another, each with the flags in argv[2:].
DRIVER = (
    "import json, sys\n"
    "from jaxlm import cli\n"
    "for argv in json.loads(sys.argv[1]):\n"
    "    code = cli.main(argv + sys.argv[2:])\n"
    "    if code:\n"
    "        sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """A tiny Llama that memorised MEMORISED_TEXT, configured to shard its parameters."""
    root = tmp_path_factory.mktemp("fsdp")
    for name in ("a", "b"):
        (root / f"{name}.txt").write_text(MEMORISED_TEXT * 20)
    overrides = [
        "model.family=llama", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.vocab_size=320", "model.max_seq_len=64", "data.seq_len=64",
        "data.validation_fraction=0.5", f"data.corpus={root}/*.txt", "train.batch_size=8",
        "train.steps=40", "train.log_every=40", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_tokens=0", "optimizer.warmup_steps=5", "optimizer.lr=1e-2",
        "checkpoint.every_steps=0", "mesh.data=1", "mesh.fsdp=-1",
    ]  # fmt: skip
    assert cli.main(["train", "-w", str(root / "run"), "--no-progress", *overrides]) == 0
    return root / "run"


def _commands(run: Path, inputs: Path, out: Path) -> list[list[str]]:
    return [
        ["eval", "-w", str(run), "--data", str(inputs / "seen.txt"), "--multiple-choice",
         str(inputs / "mc.jsonl"), "--batch-size", "4", "--no-progress", "-o", str(out / "eval.json")],
        ["generate", "-w", str(run), "--prompts-file", str(inputs / "prompts.txt"),
         "--temperature", "0", "--max-new-tokens", "12", "-o", str(out / "generate.jsonl")],
        ["finetune", "classify", "--checkpoint", str(run), "--train", str(inputs / "train.tsv"),
         "--validation", str(inputs / "val.tsv"), "-w", str(out / "clf"), "--epochs", "2",
         "--batch-size", "6", "--max-len", "16"],
        ["export", "-w", str(run), "-o", str(out / "export"), "--dtype", "bfloat16"],
        ["convert", "to-hf", str(run), "-o", str(out / "hf"), "--max-shard-gb", "0.00004"],
    ]  # fmt: skip


def _inputs(root: Path) -> Path:
    (root / "seen.txt").write_text(MEMORISED_TEXT)
    items = [
        {"context": "The quick brown", "choices": [" fox jumps", " dog sleeps"], "answer": 0},
        {"context": "A small bird", "choices": [" smiles at", " sings a song"], "answer": 1},
        {"context": "the old", "choices": [" farmer", " fire", " cat"], "answer": 0},
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / "prompts.txt").write_text("The quick brown\nA small bird\nand the old farmer\n")
    words = {"pos": ["fox", "bird", "sun"], "neg": ["dog", "cat", "fire"]}
    for name, n in (("train.tsv", 30), ("val.tsv", 12)):
        rows = [f"the {words[y][i % 3]} is here\t{y}" for i in range(n) for y in ("pos", "neg")]
        (root / name).write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def outputs(fsdp_run, tmp_path_factory) -> dict[str, Path]:
    """The same commands on 1 process x 2 devices and on 2 processes x 1 device, at once."""
    root = tmp_path_factory.mktemp("commands")
    inputs = _inputs(root)
    out = {"one": root / "one", "two": root / "two"}
    for d in out.values():
        d.mkdir()

    def start(name: str, devices: int, dist: list[str]) -> subprocess.Popen:
        flags = f"{FAST_XLA} --xla_force_host_platform_device_count={devices}"
        cmds = json.dumps(_commands(fsdp_run, inputs, out[name]))
        return subprocess.Popen(
            [sys.executable, "-c", DRIVER, cmds, *dist],
            env=_env(XLA_FLAGS=flags),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    port = free_port()
    procs = [start("one", 2, [])] + [
        start("two", 1, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                         "--process-id", str(i)])
        for i in range(2)
    ]  # fmt: skip
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-4000:]
    return out


def test_eval_on_two_processes_matches_one(outputs):
    one, two = (json.loads((outputs[k] / "eval.json").read_text()) for k in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["mesh"]["fsdp"] == two["mesh"]["fsdp"] == 2  # the parameters were split
    (a,), (b,) = one["results"], two["results"]
    assert a["tokens"] == b["tokens"] > 0
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["loss"] < 1.0  # the memorised text: a real model, not noise
    mc_one, mc_two = one["multiple_choice"], two["multiple_choice"]
    for a, b in zip(mc_one["logliks"], mc_two["logliks"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert (mc_one["items"], mc_one["acc"]) == (mc_two["items"], mc_two["acc"]) == (3, 1.0)


def test_greedy_generation_on_two_processes_matches_one(outputs):
    one, two = (
        [json.loads(line) for line in (outputs[k] / "generate.jsonl").read_text().splitlines()]
        for k in ("one", "two")
    )
    assert len(one) == 3 and [r["text"] for r in one] == [r["text"] for r in two]
    assert one[1]["text"].startswith(" sings a song")  # memorised: greedy decoding recites it


def test_classifier_on_two_processes_matches_one(outputs):
    one, two = (json.loads((outputs[k] / "clf" / "metrics.json").read_text()) for k in outputs)
    assert one["steps"] == two["steps"] == 2 * 10
    assert one["val_accuracy"] == two["val_accuracy"]
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-4)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_export_and_to_hf_on_two_processes_write_what_one_does(outputs, fsdp_run):
    full = load_run(fsdp_run).params
    for kind in outputs:
        exported = load_run(outputs[kind] / "export").params
        want = full["embed"]["embedding"].astype("bfloat16").astype("float32")
        np.testing.assert_array_equal(np.asarray(exported["embed"]["embedding"]), np.asarray(want))
    index = [
        json.loads((outputs[k] / "hf" / "model.safetensors.index.json").read_text())
        for k in outputs
    ]
    assert index[0] == index[1]
    files = sorted(set(index[0]["weight_map"].values()))
    assert len(files) > 1  # streamed into several files of at most --max-shard-gb
    for f in files:
        a, b = (load_file(str(outputs[k] / "hf" / f)) for k in outputs)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
