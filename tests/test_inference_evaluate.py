"""Evaluation (jaxlm.inference.evaluate): loss / perplexity / bits-per-byte against a direct
computation, per-file results, multiple choice (log-likelihoods, a forced answer) and the
`jaxlm eval` command."""

import dataclasses
import functools
import json
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MEMORISED_TEXT as TEXT
from conftest import cli_error, fake_devices_env

from jaxlm import cli
from jaxlm.config import ModelConfig, RunConfig, resolve
from jaxlm.data.corpus import split_documents
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.inference.evaluate import Evaluator, evaluate_choices, evaluate_text
from jaxlm.inference.scoring import choice_accuracy
from jaxlm.models import build_model
from jaxlm.parallel.sharding import logical_sharding
from jaxlm.runs import Run, model_mesh

# Non-ASCII letters make bytes differ from characters, so a wrong byte count shows.
EVAL_TEXT = "Ça va? The café owner smiles.\n\nThe fox sleeps by the fire — naïve bird.\n\nÜber."


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Run:
    """A random-parameter Llama (seq_len 64) with a small SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([TEXT * 5, EVAL_TEXT], str(root / "t.model"), vocab_size=300)
    cfg = RunConfig(
        model=ModelConfig(
            family="llama", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2,
            max_seq_len=64, init_std=0.3,
        )
    )  # fmt: skip
    cfg = resolve(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=64, doc_chars=40))
    )
    boxed = build_model(cfg.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    mesh = model_mesh(cfg)
    params = jax.device_put(nn.unbox(boxed["params"]), logical_sharding(boxed["params"], mesh))
    return Run(cfg=cfg, params=params, tokenizer=tok, step=0, mesh=mesh)


@functools.cache
def _log_softmax_fn(cfg: ModelConfig):
    model = build_model(cfg)
    return jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({"params": p}, t), axis=-1))


def direct_nats(run: Run, ids: list[int]) -> list[float]:
    """-log p of each target of one sequence, from a plain forward pass.

    Causality lets a zero-padded 64-token row stand in for it: one compile in all.
    """
    row = np.zeros((1, 64), np.int32)
    row[0, : len(ids) - 1] = ids[:-1]
    logp = np.asarray(_log_softmax_fn(run.cfg.model)(run.params, jnp.asarray(row)))[0]
    return [-float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]


def test_loss_perplexity_and_bits_per_byte_match_a_direct_computation(random_run, tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(EVAL_TEXT, encoding="utf-8")
    docs = split_documents(EVAL_TEXT, random_run.cfg.data.doc_chars)
    assert len(docs) == 3
    ev = Evaluator(random_run, batch_size=2, progress=False)
    got = evaluate_text(ev, path)

    nats, tokens = 0.0, 0
    for doc in docs:  # each fits a 64-token row, so none is cut and no context is lost
        ids = random_run.tokenizer.encode(doc, bos=True, eos=True)
        assert len(ids) <= 64
        per_token = direct_nats(random_run, ids)
        nats, tokens = nats + sum(per_token), tokens + len(per_token)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert n_bytes > sum(len(d) for d in docs)

    assert got["documents"] == 3 and got["tokens"] == tokens and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert got["bits_per_token"] * tokens == pytest.approx(got["bits_per_byte"] * n_bytes)


def test_choice_logliks_match_a_direct_computation(random_run, tmp_path):
    items = [
        {"context": "The quick brown", "choices": [" fox jumps", " bird", " café"], "answer": 0},
        {"context": "", "choices": ["A small bird", "Über"], "answer": 1},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    got = evaluate_choices(Evaluator(random_run, batch_size=2, progress=False), path)
    tok = random_run.tokenizer
    for item, lls in zip(items, got["logliks"], strict=True):
        ctx = tok.encode(item["context"], bos=True)
        for choice, ll in zip(item["choices"], lls, strict=True):
            ids = ctx + tok.encode(choice)
            want = -sum(direct_nats(random_run, ids)[len(ctx) - 1 :])
            assert ll == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert got == {**got, **choice_accuracy(items, got["logliks"]), "items": 2}


def test_a_tokenizer_larger_than_the_model_is_refused(random_run):
    small = dataclasses.replace(
        random_run.cfg, model=dataclasses.replace(random_run.cfg.model, vocab_size=100)
    )
    with pytest.raises(ConfigError, match="300 tokens but the model only 100"):
        Evaluator(dataclasses.replace(random_run, cfg=small), progress=False)


# --- the command on a run that memorised TEXT ------------------------------------------------


def _eval(argv, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["eval", "--no-progress", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_gives_per_file_results_and_defaults_to_validation(memorised_run, tmp_path, capsys):
    seen, unseen = tmp_path / "seen.txt", tmp_path / "unseen.jsonl"
    seen.write_text(TEXT)
    unseen.write_text(json.dumps({"text": "Zebras quietly yodel in fjords."}) + "\n")
    report = _eval(["--checkpoint", str(memorised_run), "--data", str(seen), str(unseen)], capsys)
    assert report["step"] == 60
    by_file = {r["data"]: r for r in report["results"]}
    assert list(by_file) == [str(seen), str(unseen)]
    assert by_file[str(seen)]["documents"] == 1
    assert by_file[str(seen)]["bytes"] == len(TEXT.strip().encode())
    # The memorised text scores far better than text it never saw.
    assert by_file[str(seen)]["bits_per_byte"] < 0.5 < by_file[str(unseen)]["bits_per_byte"]

    val = _eval(["--checkpoint", str(memorised_run / "checkpoints" / "30")], capsys)
    assert val["step"] == 30
    (res,) = val["results"]
    assert res["data"] == "validation" and res["tokens"] > 0 and res["bits_per_byte"] > 0


def test_eval_on_four_devices_matches_one(memorised_run, tmp_path, capsys):
    data = tmp_path / "seen.txt"
    data.write_text(TEXT * 3)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "The quick", "choices": [" brown", " cat"], "answer": 0}))
    argv = ["-w", str(memorised_run), "--data", str(data), "--multiple-choice", str(mc)]
    one = _eval([*argv, "--batch-size", "4"], capsys)
    env = fake_devices_env(4)
    code = "import sys; from jaxlm import cli; sys.exit(cli.main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, "eval", "--no-progress", "--batch-size", "4", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    four = json.loads(out.stdout)
    assert (one["devices"], four["devices"]) == (1, 4)
    (a,), (b,) = one["results"], four["results"]
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    lls_one, lls_four = one["multiple_choice"]["logliks"], four["multiple_choice"]["logliks"]
    np.testing.assert_allclose(lls_one, lls_four, rtol=1e-5)


def test_a_prepared_shard_set_scores_like_its_text(memorised_run, tmp_path, capsys):
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT.split("\n\n") if t))
    prep = tmp_path / "prep"
    argv = [
        "data",
        "prepare",
        "--input",
        str(text),
        "--tokenizer",
        str(memorised_run / "tokenizer.model"),
    ]
    assert cli.main([*argv, "--output", str(prep), "--no-progress"]) == 0
    a, b = _eval(["-w", str(memorised_run), "--data", str(prep), str(text)], capsys)["results"]
    assert a["documents"] == b["documents"] == 2
    for key in ("tokens", "bytes", "loss", "bits_per_byte"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_multiple_choice_picks_the_memorised_continuation(memorised_run, tmp_path, capsys):
    # Each wrong choice holds the right one's words in another order: same bytes, same
    # characters, so only a model that learned the text prefers the right one.
    items = [
        ("The quick brown fox", " jumps over the lazy dog", " over the dog jumps lazy"),
        ("A small bird sings", " a song of spring", " of a spring song"),
        ("and the old farmer", " smiles at the morning sun", " the sun smiles at morning"),
        ("while the cat sleeps", " by the warm fire", " the fire by warm"),
    ]
    lines = [
        {"context": c, "choices": [wrong, right] if i % 2 else [right, wrong], "answer": i % 2}
        for i, (c, right, wrong) in enumerate(items)
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    mc = _eval(["-w", str(memorised_run), "--multiple-choice", str(path)], capsys)[
        "multiple_choice"
    ]
    assert mc["items"] == 4 and mc["acc"] == 1.0 and mc["acc_norm"] == 1.0


def test_eval_errors_are_one_line(memorised_run, tmp_path, capsys):
    err = cli_error(["eval", "--checkpoint", str(tmp_path / "missing")], capsys)
    assert "missing" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0})
        + "\n\n"
        + json.dumps({"context": "a", "choices": ["b"], "answer": 0})
        + "\n"
    )
    err = cli_error(["eval", "-w", str(memorised_run), "--multiple-choice", str(bad)], capsys)
    assert "line 3" in err
    bad.write_text('{"context": "a", "choices": ["b", "c"], "answer": 2}\n')
    err = cli_error(["eval", "-w", str(memorised_run), "--multiple-choice", str(bad)], capsys)
    assert "line 1" in err and "answer 2" in err
    err = cli_error(["eval", "-w", str(memorised_run), "--step", "7"], capsys)
    assert "--step 7" in err
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    err = cli_error(["eval", "-w", str(memorised_run), "--data", str(text)], capsys)
    assert "line 2" in err
