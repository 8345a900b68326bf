"""Load a finished (or running) training run for evaluation and sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxlm.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.config import ConfigError, MeshConfig, RunConfig, load_config
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.models.transformer import build_model
from jaxlm.sharding import make_mesh
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import state_shardings


@dataclasses.dataclass
class Run:
    """A run's config, its latest parameters and its tokenizer."""

    cfg: RunConfig
    params: Any
    tokenizer: Tokenizer
    step: int


def load_run(workdir: str | Path) -> Run:
    """Restore the newest checkpoint of `workdir` onto the local devices."""
    workdir = Path(workdir)
    cfg_path = workdir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{workdir}' holds no config.yaml; pass the --workdir of a jaxlm run.")
    cfg = load_config(cfg_path)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"'{workdir}' has no checkpoint yet; train it first (jaxlm train).")
    tok_path = cfg.data.tokenizer or str(workdir / "tokenizer.model")
    tokenizer = Tokenizer.load(tok_path)
    mesh = make_mesh(MeshConfig(data=-1), jax.local_devices()[:1])
    model = build_model(cfg.model)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    abstract, shardings = state_shardings(model, tx, cfg.data.seq_len, mesh)
    state = ckpt.restore(step, abstract_with_shardings(abstract, shardings))
    ckpt.close()
    return Run(cfg=cfg, params=state.params, tokenizer=tokenizer, step=step)
