"""Load a finished (or running) training run, or an export of one, for evaluation and sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxlm.config import ConfigError, RunConfig, load_config
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.export import EXPORT_INFO, load_exported, restore_params


@dataclasses.dataclass
class Run:
    """A run's config, its parameters (float32, on one device) and its tokenizer."""

    cfg: RunConfig
    params: Any
    tokenizer: Tokenizer
    step: int


def load_run(workdir: str | Path, step: int | None = None) -> Run:
    """Restore a run directory's checkpoint (newest readable by default) or an export."""
    workdir = Path(workdir)
    cfg_path = workdir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{workdir}' holds no config.yaml; pass the --workdir of a jaxlm run.")
    cfg = load_config(cfg_path)
    # An export carries its own copy of the tokenizer; a run trained here caches it too.
    local = workdir / "tokenizer.model"
    use_local = local.is_file() or not cfg.data.tokenizer
    tokenizer = load_tokenizer(str(local) if use_local else cfg.data.tokenizer)
    if (workdir / EXPORT_INFO).is_file():
        params, saved_step = load_exported(workdir, cfg)
    else:
        params, saved_step = restore_params(workdir, cfg, step)
    return Run(cfg=cfg, params=params, tokenizer=tokenizer, step=saved_step)
