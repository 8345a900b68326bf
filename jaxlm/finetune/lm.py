"""LM fine-tuning from a pretrained checkpoint (`train.init_from`).

The run starts from the source's parameters with a fresh optimizer at step 0, on the
source's tokenizer. The model's architecture fields must match the source's (its parameters
must fit); runtime fields may differ, and a change of `scan_layers` restacks the blocks.
With `model.lora_rank` the source's plain parameters become the frozen base and fresh
adapters are added; a source's own adapters are kept if its LoRA settings are the run's,
else merged into its kernels first.
Once the fine-tuning run has checkpoints of its own, resuming continues from those. The
source, like the config file, may be local or in a bucket (gs://, s3://)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import yaml

from jaxlm import config as config_lib
from jaxlm.config import ModelConfig, RunConfig
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.models import build_model, lora
from jaxlm.models.scan import stack_blocks, unstack_blocks
from jaxlm.paths import absolute, as_path, check_reachable
from jaxlm.runs import load_run

logger = logging.getLogger(__name__)


def source_config(path: str | Path) -> RunConfig:
    """The resolved config of a run, export or converted directory."""
    check_reachable(path, "The checkpoint")
    path = as_path(path, "The checkpoint")
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"'{path}' holds no config.yaml; give the directory of a jaxlm run, an export or "
            f"a converted Hugging Face model."
        )
    return config_lib.load_config(path / "config.yaml")


def source_tokenizer_path(path: str | Path, cfg: RunConfig) -> str:
    """The tokenizer file that belongs to a run, export or converted directory."""
    path = as_path(path, "The checkpoint")
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return str(absolute(path / name))
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    raise ConfigError(f"'{path}' holds no tokenizer.model or tokenizer.json; copy its tokenizer.")


def check_same_model(new: ModelConfig, old: ModelConfig, src: str) -> None:
    """Refuse a model config whose parameters would not be the source's (runtime fields aside)."""
    runtime = config_lib.runtime_fields()
    for key, (old_v, new_v) in config_lib.model_changes(dataclasses.asdict(old), new).items():
        if key not in runtime:
            raise ConfigError(
                f"model.{key}={new_v!r} differs from the checkpoint '{src}' ({old_v!r}), so "
                f"its parameters don't fit; drop that setting or start from a matching "
                f"checkpoint."
            )


def restack(params: Any, old: ModelConfig, new: ModelConfig) -> Any:
    """`old`'s parameters in the tree `new` expects: its blocks stacked or one per layer."""
    if old.scan_layers == new.scan_layers:
        return params
    convert = stack_blocks if new.scan_layers else unstack_blocks
    return convert(params, new.n_layers)


def resolve_init_from(cfg: RunConfig) -> RunConfig:
    """Check `train.init_from` against `cfg` and default data.tokenizer to the source's."""
    src = cfg.train.init_from
    src_cfg = source_config(src)
    check_same_model(cfg.model, src_cfg.model, src)
    tok_path = source_tokenizer_path(src, src_cfg)
    if cfg.data.tokenizer is None:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tok_path))
    if load_tokenizer(cfg.data.tokenizer).sha256 != load_tokenizer(tok_path).sha256:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer!r} is not the tokenizer of the checkpoint "
            f"'{src}' ({tok_path}); leave data.tokenizer unset to use the checkpoint's."
        )
    return cfg


def load_init_params(cfg: RunConfig, shardings: Any) -> Any:
    """The parameters of `train.init_from`, restored straight into the run's shardings.

    Each process reads only the shards it holds; nothing is gathered onto one device or host.
    """
    mesh = jax.tree.leaves(shardings)[0].mesh
    run = load_run(cfg.train.init_from, mesh=mesh)
    params = run.params
    if lora.has_adapters(params) and _lora_settings(run.cfg.model) != _lora_settings(cfg.model):
        params = jax.jit(lora.merge, static_argnums=1)(params, lora.lora_scale(run.cfg.model))
    params = restack(params, run.cfg.model, cfg.model)
    if cfg.model.lora_rank and not lora.has_adapters(params):
        params = lora.combine(params, fresh_adapters(cfg, shardings))
    if jax.tree.structure(params) != jax.tree.structure(shardings):
        raise ConfigError(
            f"The parameters in '{cfg.train.init_from}' are laid out differently from this "
            f"model's; start from a checkpoint of the same model config."
        )
    logger.info(f"Initialised from '{cfg.train.init_from}' (its step {run.step}); fresh optimizer.")
    return jax.device_put(params, shardings)  # only moves what restacking laid out otherwise


def _lora_settings(m: ModelConfig) -> tuple[Any, ...]:
    return m.lora_rank, m.lora_alpha, m.lora_target_set


def fresh_adapters(cfg: RunConfig, shardings: Any) -> Any:
    """The LoRA adapters a new run of `cfg` initialises (the same as `init_train_state`'s),
    in their shardings; the base parameters' initialisation is compiled away."""
    model = build_model(cfg.model)
    params_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))[0]
    tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)

    def init() -> Any:
        return lora.split(nn.unbox(model.init(params_rng, tokens)["params"]))[1]

    return jax.jit(init, out_shardings=lora.split(shardings)[1])()


def lm_finetune_config(checkpoint: str, config_path: str | None, overrides: list[str]) -> RunConfig:
    """A run config for fine-tuning `checkpoint`'s LM: its model and seq_len unless overridden."""
    src_cfg = source_config(checkpoint)
    raw: dict[str, Any] = {}
    if config_path is not None:
        check_reachable(config_path, "--config")
        if not as_path(config_path, "--config").is_file():
            raise ConfigError(f"Config file '{config_path}' does not exist; pass a YAML file.")
        try:
            raw = yaml.safe_load(as_path(config_path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise ConfigError(f"Config file '{config_path}' is not valid YAML; fix it.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{config_path}' must hold a mapping of sections.")
    for section in ("model", "data"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"Config section '{section}' must be a mapping of keys to values.")
    model = {**dataclasses.asdict(src_cfg.model), **(raw.get("model") or {})}
    data = {"seq_len": src_cfg.data.seq_len, **(raw.get("data") or {})}
    raw = {**raw, "model": model, "data": data}
    for section, kv in config_lib.parse_overrides(
        [*overrides, f"train.init_from={absolute(checkpoint)}"]
    ).items():
        raw[section] = {**(raw.get(section) or {}), **kv}
    cfg = config_lib.resolve(config_lib.from_dict(raw))
    config_lib.validate(cfg)
    return cfg
