"""`jaxlm finetune`: LM fine-tuning from a checkpoint and sequence classification."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
from conftest import TINY_MODEL

from jaxlm import cli
from jaxlm.data.labeled import label_ids, label_names, read_labeled, split_examples
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.errors import ConfigError

TINY = [
    *TINY_MODEL,
    "train.batch_size=8",
    "train.steps=30",
    "train.log_every=10",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "optimizer.lr=1e-2",
    "optimizer.warmup_steps=3",
    "checkpoint.every_steps=0",
]

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


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Transformer LM trained for 30 steps on the bundled corpus."""
    workdir = tmp_path_factory.mktemp("pre") / "run"
    extra = ["train.eval_every=30", "checkpoint.every_steps=30"]
    assert cli.main(["train", "-w", str(workdir), "--no-progress", *TINY, *extra]) == 0
    return workdir


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
    assert "already holds a classifier" in _error(argv, capsys)


def _lm_finetune(pretrained, out, steps: int, capsys) -> dict:
    argv = ["finetune", "lm", "--checkpoint", str(pretrained), "-w", str(out), "--no-progress"]
    argv += ["train.eval_every=2", "checkpoint.every_steps=2", "train.sample_tokens=0"]
    # The same validation batches as the pretraining run: same batch size and count.
    argv += ["optimizer.warmup_steps=0", "train.batch_size=8", "train.eval_batches=2"]
    capsys.readouterr()
    assert cli.main([*argv, f"train.steps={steps}"]) == 0
    return json.loads(capsys.readouterr().err.strip().splitlines()[-1])


def test_lm_finetune_starts_from_the_checkpoint(pretrained, tmp_path, capsys):
    pre = {r["step"]: r["loss"] for r in _records(pretrained) if r["split"] == "eval"}
    assert pre[30] < pre[0] - 0.5  # the checkpoint is better than a fresh init
    out = tmp_path / "ft"
    summary = _lm_finetune(pretrained, out, 2, capsys)
    # Step 0 evaluates the checkpoint's own parameters on the same validation batches.
    assert summary["first_eval_loss"] == pytest.approx(pre[30], rel=1e-5)
    saved = (out / "config.yaml").read_text()
    assert f"init_from: {pretrained}" in saved and "tokenizer.model" in saved
    # Run again, it is complete: it resumed from its own step 2, not from init_from.
    assert _lm_finetune(pretrained, out, 2, capsys)["start_step"] == 2


@pytest.mark.slow
def test_lm_finetune_rerun_continues_its_own_checkpoints(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    _lm_finetune(pretrained, out, 2, capsys)
    assert _lm_finetune(pretrained, out, 4, capsys)["start_step"] == 2
    records = _records(out)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 2, 4]


def test_lm_finetune_refuses_a_mismatched_model_or_tokenizer(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    base = ["finetune", "lm", "--checkpoint", str(pretrained), "-w", str(out)]
    err = _error([*base, "model.d_model=64"], capsys)
    assert "model.d_model=64" in err and "32" in err
    # The same check guards `jaxlm train` with train.init_from.
    init = f"train.init_from={pretrained}"
    err = _error(["train", "-w", str(out), *TINY, "model.n_layers=2", init], capsys)
    assert "model.n_layers=2" in err

    text = ["To be, or not to be, that is the question."] * 200
    other = train_tokenizer(text, str(tmp_path / "other.model"), vocab_size=512)
    err = _error([*base, f"data.tokenizer={other.path}"], capsys)
    assert "not the tokenizer of the checkpoint" in err
    assert not out.exists()


def test_lm_finetune_config_takes_the_checkpoints_model(pretrained, tmp_path):
    from jaxlm.config import load_config
    from jaxlm.finetune.lm import lm_finetune_config

    user = tmp_path / "ft.yaml"
    user.write_text("train:\n  steps: 5\nmodel:\n  dropout: 0.1\n", encoding="utf-8")
    cfg = lm_finetune_config(str(pretrained), str(user), ["optimizer.warmup_steps=1"])
    pre = load_config(pretrained / "config.yaml")
    assert cfg.model == dataclasses.replace(pre.model, dropout=0.1)
    assert cfg.data.seq_len == pre.data.seq_len == 32
    assert cfg.train.steps == 5 and cfg.train.init_from == str(pretrained)


@pytest.mark.parametrize(
    ("name", "content", "line", "words"),
    [
        ("d.tsv", "text\tlabel\ngood day\tpos\nbad\tday\tneg\n", 3, "found 3"),
        ("d.tsv", "good day\tpos\nno label here\n", 2, "found 1"),
        ("d.tsv", "good day\tpos\nbad day\t \n", 2, "label is empty"),
        ("d.jsonl", '{"text": "good", "label": 1}\n{"text": "bad"}\n', 2, '"label" field'),
        ("d.jsonl", '{"text": "good", "label": 1}\n\n{"text": "x", "label": 0\n', 3, "JSON"),
        ("d.jsonl", '{"text": "good", "label": true}\n', 1, "string or an integer"),
    ],
)
def test_bad_lines_are_reported_with_their_number(tmp_path, name, content, line, words):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        read_labeled(path)
    msg = str(exc.value)
    assert f"line {line}:" in msg and words in msg and "\n" not in msg


def test_bad_file_is_refused_by_the_cli_in_one_line(pretrained, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("fine\tpos\nbad\tneg\tx\n", encoding="utf-8")
    argv = ["finetune", "classify", "--checkpoint", str(pretrained)]
    err = _error([*argv, "--train", str(bad), "-w", str(tmp_path / "c")], capsys)
    assert "line 2" in err


def test_labels_map_and_split_is_seeded(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "label": i % 3 * 5} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = read_labeled(path)
    names = label_names(examples)
    assert names == ["0", "5", "10"]  # numeric order, not string order
    assert label_ids(examples[:3], names, str(path)).tolist() == [0, 1, 2]
    a = split_examples(examples, 0.2, seed=3)
    b = split_examples(examples, 0.2, seed=3)
    assert a == b and len(a[1]) == 6 and not set(a[0]) & set(a[1])
    assert split_examples(examples, 0.2, seed=4)[1] != a[1]
    with pytest.raises(ConfigError, match="line 1: label 'x'"):
        label_ids([examples[0].__class__("t", "x", 1)], names, "val.tsv")


def _random_export(tmp_path, pretrained, overrides: list[str]):
    """An export directory holding freshly initialised parameters of another model."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxlm.config import load_config, to_yaml
    from jaxlm.models import build_model
    from jaxlm.runs import EXPORT_INFO

    cfg = load_config(None, [*TINY, *overrides])
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

    model = SequenceClassifier(load_config(None, TINY).model, 2)
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
    err = _error([*argv, "-w", str(tmp_path / "c"), "--bidirectional"], capsys)
    assert "--bidirectional" in err and "llama" in err


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",
        pytest.param("lstm", marks=pytest.mark.slow),
        pytest.param("hawk", marks=pytest.mark.slow),
    ],
)
def test_return_hidden_is_what_the_tied_head_reads(family):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxlm.config import load_config
    from jaxlm.models import build_model

    cfg = load_config(None, [*TINY, f"model.family={family}"]).model
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, cfg.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))["params"]
    apply = jax.jit(model.apply, static_argnames="return_hidden")
    hidden_BxSxD = apply({"params": params}, tokens, return_hidden=True)
    logits_BxSxV = apply({"params": params}, tokens)
    assert hidden_BxSxD.shape == (2, 7, cfg.d_model)
    expected = hidden_BxSxD @ params["embed"]["embedding"].T  # tied embeddings
    assert jnp.allclose(logits_BxSxV, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["lm", "classify", "predict"])
def test_finetune_help_gives_each_option_one_line(kind, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", kind, "--help"])
    options = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  -")]
    assert len(options) >= 3
    assert all("  " in ln.strip() for ln in options), options
