"""`jaxlm finetune lm` and `train.init_from` (jaxlm.finetune.lm): a fine-tune starts from
the checkpoint's parameters and model, refuses another model or tokenizer, resumes its own
checkpoints, and restacks blocks between scanned and per-layer trees."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import TINY_LM, TINY_MODEL, cli_error

from jaxlm import cli
from jaxlm.config import ModelConfig, load_config
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.finetune.lm import lm_finetune_config, restack
from jaxlm.models import build_model


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


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
    err = cli_error([*base, "model.d_model=64"], capsys)
    assert "model.d_model=64" in err and "32" in err
    # The same check guards `jaxlm train` with train.init_from.
    init = f"train.init_from={pretrained}"
    err = cli_error(["train", "-w", str(out), *TINY_LM, "model.n_layers=2", init], capsys)
    assert "model.n_layers=2" in err

    text = ["To be, or not to be, that is the question."] * 200
    other = train_tokenizer(text, str(tmp_path / "other.model"), vocab_size=512)
    err = cli_error([*base, f"data.tokenizer={other.path}"], capsys)
    assert "not the tokenizer of the checkpoint" in err
    assert not out.exists()


def test_lm_finetune_config_takes_the_checkpoints_model(pretrained, tmp_path):
    user = tmp_path / "ft.yaml"
    user.write_text("train:\n  steps: 5\nmodel:\n  dropout: 0.1\n", encoding="utf-8")
    cfg = lm_finetune_config(str(pretrained), str(user), ["optimizer.warmup_steps=1"])
    pre = load_config(pretrained / "config.yaml")
    assert cfg.model == dataclasses.replace(pre.model, dropout=0.1)
    assert cfg.data.seq_len == pre.data.seq_len == 32
    assert cfg.train.steps == 5 and cfg.train.init_from == str(pretrained)


# --- restacking ----------------------------------------------------------------------------


def _param_shapes(model: ModelConfig, params=None):
    """The shapes of `model`'s parameter tree (of `params`, if given, else a fresh init)."""
    if params is None:
        init = build_model(model).init
        params = nn.unbox(jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
        params = params["params"]
    return jax.tree.map(lambda x: x.shape, params)


def test_restack_converts_between_scanned_and_per_layer_trees():
    plain = load_config(None, [*TINY_MODEL, "model.n_layers=2"]).model
    scanned = dataclasses.replace(plain, scan_layers=True)
    for old, new in [(plain, scanned), (scanned, plain)]:
        params = jax.tree.map(jnp.zeros, _param_shapes(old), is_leaf=lambda x: isinstance(x, tuple))
        assert _param_shapes(new, restack(params, old, new)) == _param_shapes(new)
        assert restack(params, old, old) is params
