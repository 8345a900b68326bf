"""Which config changes block a resume: unit checks of `check_resumable`."""

from pathlib import Path

import pytest

from jaxlm.config import load_config, to_dict
from jaxlm.errors import ConfigError
from jaxlm.train.resume import check_resumable


def test_field_newer_than_the_checkpoint_does_not_block_resume():
    cfg = load_config(None, [])
    saved = to_dict(cfg)
    del saved["model"]["rnn_residual"]  # as written by a jaxlm that had no such field
    check_resumable(saved, cfg, Path("run"))


def test_changed_model_field_is_named():
    cfg = load_config(None, [])
    saved = to_dict(load_config(None, ["model.d_model=128"]))
    with pytest.raises(ConfigError, match=r"model\.d_model=256 .*\(128\)"):
        check_resumable(saved, cfg, Path("run"))


def test_changed_batch_size_is_refused_but_steps_are_not():
    cfg = load_config(None, ["train.steps=2000"])
    check_resumable(to_dict(load_config(None, [])), cfg, Path("run"))
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_resumable(to_dict(load_config(None, ["train.batch_size=64"])), cfg, Path("run"))
