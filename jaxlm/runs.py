"""The run directory format: a run's config, tokenizer and parameters, and exports of them.

A run directory (written by `jaxlm train`) holds config.yaml, the tokenizer, metrics.jsonl,
tensorboard/ and checkpoints/. An export directory holds what is needed to run the model
and nothing of training:
  params/          Orbax checkpoint of the parameter tree (float32 or bfloat16)
  config.yaml      the run's resolved config
  tokenizer.model  the SentencePiece model (and .vocab when present)
  export.json      source run, step and dtype
`load_run(DIR)` reads either kind."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlm.config import MeshConfig, RunConfig, load_config
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.models import build_model
from jaxlm.parallel.sharding import make_mesh
from jaxlm.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import state_shardings


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
    # An export carries its own copy of the tokenizer (a Hugging Face conversion may carry a
    # tokenizer.json instead); a run trained here caches it too.
    local = next(
        (p for p in (workdir / "tokenizer.model", workdir / "tokenizer.json") if p.is_file()),
        workdir / "tokenizer.model",
    )
    use_local = local.is_file() or not cfg.data.tokenizer
    tokenizer = load_tokenizer(str(local) if use_local else cfg.data.tokenizer)
    if (workdir / EXPORT_INFO).is_file():
        params, saved_step = load_exported(workdir, cfg)
    else:
        params, saved_step = restore_params(workdir, cfg, step)
    return Run(cfg=cfg, params=params, tokenizer=tokenizer, step=saved_step)


def checkpoint_dir(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(directory for load_run, step): RUN/checkpoints/N becomes (RUN, N)."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit() and path.is_dir():
        if step is not None and step != int(path.name):
            raise ConfigError(f"--step {step} contradicts the checkpoint '{path}'; drop --step.")
        path, step = path.parent.parent, int(path.name)
    if not path.is_dir():
        raise ConfigError(f"--checkpoint '{path}' is not a directory; give a run or export dir.")
    return path, step


def open_checkpoint(path: str | Path, step: int | None = None) -> Run:
    """`load_run` for any --checkpoint: a run, an export, a converted model or RUN/checkpoints/N.

    Refuses a tokenizer whose ids would not all fit the model's embedding table.
    """
    run = load_run(*checkpoint_dir(path, step))
    check_vocab(run)
    return run


def check_vocab(run: Run) -> None:
    """Refuse a tokenizer with more ids than the model has embeddings (a padded table is fine)."""
    if run.tokenizer.vocab_size > run.cfg.model.vocab_size:
        raise ConfigError(
            f"The tokenizer '{run.tokenizer.path}' has {run.tokenizer.vocab_size} tokens but the "
            f"model only {run.cfg.model.vocab_size} embeddings; pair the checkpoint with the "
            "tokenizer it was trained with."
        )


EXPORT_INFO = "export.json"


EXPORT_DTYPES = ("float32", "bfloat16")


def abstract_params(cfg: RunConfig) -> tuple[Any, Any]:
    """(abstract train state, abstract params) placed on this process's first device."""
    mesh = make_mesh(MeshConfig(data=-1), jax.local_devices()[:1])
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    abstract, shardings = state_shardings(build_model(cfg.model), tx, cfg.data.seq_len, mesh)
    abstract = abstract_with_shardings(abstract, shardings)
    return abstract, abstract.params


def restore_params(workdir: Path, cfg: RunConfig, step: int | None = None) -> tuple[Any, int]:
    """(params, step) of a run's checkpoint, skipping optimizer state; newest readable by default."""
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"'{workdir}' has no checkpoint yet; train it first (jaxlm train).")
    _, abstract = abstract_params(cfg)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint, read_only=True)
    try:
        steps = ckpt.all_steps()
        if step is None:
            restored = ckpt.restore_latest(abstract, params_only=True)
            if restored is None:
                raise ConfigError(f"'{workdir}' has no checkpoint yet; train it first.")
            return restored.state, restored.step
        if step not in steps:
            raise ConfigError(
                f"--step {step} is not a checkpoint of '{workdir}'; choose one of "
                f"{', '.join(map(str, steps)) or '(none)'}."
            )
        return ckpt.restore_params(step, abstract), step
    finally:
        ckpt.close()


def export_params(
    workdir: str | Path, output: str | Path, step: int | None = None, dtype: str = "float32"
) -> dict[str, Any]:
    """Write a params-only export of `workdir` into the new directory `output`."""
    workdir, output = Path(workdir), Path(output)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use {' or '.join(EXPORT_DTYPES)}.")
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output '{output}' already exists and is not empty; name a new one.")
    cfg_path = workdir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{workdir}' holds no config.yaml; pass the --workdir of a jaxlm run.")
    cfg = load_config(cfg_path)
    tok_path = Path(cfg.data.tokenizer or workdir / "tokenizer.model")
    if not tok_path.is_file():
        raise ConfigError(f"The run's tokenizer '{tok_path}' is missing; it can't be exported.")
    params, step = restore_params(workdir, cfg, step)
    params = jax.tree.map(lambda x: x.astype(dtype), params)

    # Build the export beside its destination and rename it at the end: a crash leaves no
    # half-written export under the requested name.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp.absolute() / "params", params)
            checkpointer.wait_until_finished()
        shutil.copyfile(cfg_path, tmp / "config.yaml")
        for suffix in (".model", ".vocab"):
            src = tok_path.with_suffix(suffix)
            if src.is_file():
                shutil.copyfile(src, tmp / f"tokenizer{suffix}")
        n_params = sum(int(x.size) for x in jax.tree.leaves(params))
        info = {"source": str(workdir.absolute()), "step": step, "dtype": dtype}
        info["params"] = n_params
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            output.rmdir()  # empty, checked above
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "output": str(output)}


def load_exported(path: Path, cfg: RunConfig) -> tuple[Any, int]:
    """(float32 params, step) of an export directory."""
    info = json.loads((path / EXPORT_INFO).read_text(encoding="utf-8"))
    _, abstract = abstract_params(cfg)
    stored = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(info["dtype"]), sharding=a.sharding),
        abstract,
    )
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore((path / "params").absolute(), stored)
    return jax.tree.map(lambda x: x.astype(jnp.float32), params), int(info["step"])
