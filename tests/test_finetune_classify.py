"""`jaxlm finetune classify` and `predict` (jaxlm.finetune.classify): a sequence classifier
on a pretrained LM reaches high validation accuracy, the bidirectional LSTM encoder, the
classifier's train step, and bad input refused in one line."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import TINY_LM, cli_error

from jaxlm import cli

POSITIVE = ["good", "great", "lovely", "happy", "fine", "sweet", "fair", "noble"]
NEGATIVE = ["bad", "poor", "sad", "vile", "foul", "cruel", "sick", "false"]
NOUNS = ["king", "day", "play", "night", "queen", "world", "house", "song"]
# Validation sentences use templates never seen in training: the classifier has to pick
# out the sentiment word, not memorise sentences.
TRAIN_TEMPLATES = [
    "the {n} is {w}",
    "what a {w} {n}",
    "i find the {n} {w}",
    "this {n} seems {w} to me",
    "a {w} {n} indeed",
]
VAL_TEMPLATES = ["my lord, the {n} was {w}", "so {w} a {n}", "they say the {n} is {w} today"]


def sentiment_rows(templates: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """A balanced set of (sentence, pos|neg)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        text = rng.choice(templates).format(n=rng.choice(NOUNS), w=word)
        rows.append((text, "pos" if positive else "neg"))
    return rows


def write_tsv(path, rows) -> str:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return str(path)


def test_classifier_reaches_high_validation_accuracy(pretrained, tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(TRAIN_TEMPLATES, 320, 0))
    val_rows = sentiment_rows(VAL_TEMPLATES, 100, 1)
    val = write_tsv(tmp_path / "val.tsv", val_rows)
    out = tmp_path / "clf"
    argv = ["finetune", "classify", "--checkpoint", str(pretrained), "-w", str(out)]
    argv += ["--train", train, "--validation", val, "--epochs", "10", "--lr", "1e-2"]
    argv += ["--backbone-lr", "3e-3", "--eval-every", "50"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["initial_val_accuracy"] == pytest.approx(0.5, abs=0.1)
    assert summary["val_accuracy"] >= 0.8, summary

    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 50, 100]
    info = json.loads((out / "classifier.json").read_text())
    assert info["labels"] == ["neg", "pos"] and info["pooling"] == "last non-pad token"

    # The saved classifier alone reproduces the reported validation accuracy.
    assert cli.main(["finetune", "predict", "-w", str(out), "--input", val]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in preds] == [t for t, _ in val_rows]
    acc = sum(p["label"] == y for p, (_, y) in zip(preds, val_rows, strict=True)) / len(val_rows)
    assert acc == pytest.approx(summary["val_accuracy"])
    # A second run into the same directory is refused instead of overwriting it.
    assert "already holds a classifier" in cli_error(argv, capsys)


def test_bad_file_is_refused_by_the_cli_in_one_line(pretrained, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("fine\tpos\nbad\tneg\tx\n", encoding="utf-8")
    argv = ["finetune", "classify", "--checkpoint", str(pretrained)]
    err = cli_error([*argv, "--train", str(bad), "-w", str(tmp_path / "c")], capsys)
    assert "line 2" in err


def _random_export(tmp_path, pretrained, overrides: list[str]):
    """An export directory holding freshly initialised parameters of another model."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxlm.config import load_config, to_yaml
    from jaxlm.models import build_model
    from jaxlm.runs import EXPORT_INFO

    cfg = load_config(None, [*TINY_LM, *overrides])
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.jit(build_model(cfg.model).init)(jax.random.PRNGKey(0), tokens))["params"]
    out = tmp_path / "export"
    out.mkdir()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((out / "params").absolute(), params)
        ckpt.wait_until_finished()
    (out / "config.yaml").write_text(to_yaml(cfg))
    shutil.copyfile(pretrained / "tokenizer.model", out / "tokenizer.model")
    (out / EXPORT_INFO).write_text(json.dumps({"step": 0, "dtype": "float32"}))
    return out


def test_bidirectional_lstm_classifier_runs(pretrained, tmp_path, capsys):
    # The head alone learns here (a frozen body compiles without the backward scans, which
    # keeps this fast); the slow variant below trains the whole encoder.
    src = _random_export(tmp_path, pretrained, ["model.family=lstm"])
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(TRAIN_TEMPLATES, 64, 0))
    out = tmp_path / "clf"
    argv = ["finetune", "classify", "--checkpoint", str(src), "-w", str(out), "--train", train]
    argv += ["--bidirectional", "--epochs", "1", "--validation-fraction", "0.25"]
    assert cli.main([*argv, "--freeze-backbone"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["train_examples"] == 48 and summary["val_examples"] == 16
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    # The embedding and the first forward layer come from the LM; the rest is new.
    assert "tensors copied" in captured.err and "freshly initialised" in captured.err
    info = json.loads((out / "classifier.json").read_text())
    assert info["bidirectional"] and info["pooling"].startswith("forward last")


@pytest.mark.slow
def test_bidirectional_lstm_classifier_learns(pretrained, tmp_path, capsys):
    src = _random_export(tmp_path, pretrained, ["model.family=lstm"])
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(TRAIN_TEMPLATES, 320, 0))
    val = write_tsv(tmp_path / "val.tsv", sentiment_rows(VAL_TEMPLATES, 100, 1))
    argv = ["finetune", "classify", "--checkpoint", str(src), "-w", str(tmp_path / "clf")]
    argv += ["--train", train, "--validation", val, "--bidirectional", "--epochs", "10"]
    assert cli.main([*argv, "--lr", "1e-2", "--backbone-lr", "3e-3"]) == 0
    assert json.loads(capsys.readouterr().out)["val_accuracy"] >= 0.8


def test_classifier_step_is_the_weighted_mean_and_spares_a_frozen_backbone():
    import jax
    import numpy as np

    from jaxlm.config import load_config
    from jaxlm.finetune.classify import (
        ClassifyOptions,
        make_classifier_optimizer,
        make_classifier_steps,
    )
    from jaxlm.models.classifier import SequenceClassifier, init_params
    from jaxlm.train.state import new_train_state

    model = SequenceClassifier(load_config(None, TINY_LM).model, 2)
    params = init_params(model, 8, 0)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 512, (4, 8)).astype(np.int32),
        "lengths": np.array([8, 3, 5, 1], np.int32),
        "labels": np.array([0, 1, 1, 0], np.int32),
        "weights": np.array([1, 1, 1, 0], np.float32),  # the last row is padding
    }
    for frozen in (False, True):
        o = ClassifyOptions("ckpt", "train.tsv", "out", lr=1e-2, freeze_backbone=frozen)
        tx = make_classifier_optimizer(o, total_steps=4)
        step, eval_step = make_classifier_steps(model, tx, frozen, dropout=False)
        ev = jax.jit(eval_step)(params, batch)
        new, metrics = jax.jit(step)(new_train_state(params, tx, jax.random.PRNGKey(0)), batch)
        assert float(ev["n"]) == 3 and int(new.step) == 1
        assert float(metrics["loss"]) == pytest.approx(float(ev["loss_sum"]) / 3, rel=1e-6)
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new.params)
        moved = {part: any(jax.tree.leaves(changed[part])) for part in ("backbone", "head")}
        assert moved == {"backbone": not frozen, "head": True}


def test_bidirectional_needs_a_recurrent_checkpoint(pretrained, tmp_path, capsys):
    train = write_tsv(tmp_path / "t.tsv", sentiment_rows(TRAIN_TEMPLATES, 20, 0))
    argv = ["finetune", "classify", "--checkpoint", str(pretrained), "--train", train]
    err = cli_error([*argv, "-w", str(tmp_path / "c"), "--bidirectional"], capsys)
    assert "--bidirectional" in err and "llama" in err
