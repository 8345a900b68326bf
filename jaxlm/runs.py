"""The run directory format: a run's config, tokenizer and parameters, and exports of them.

A run directory (written by `jaxlm train`) holds config.yaml, the tokenizer, metrics.jsonl,
tensorboard/ and checkpoints/. An export directory holds what is needed to run the model
and nothing of training:
  params/          Orbax checkpoint of the parameter tree (float32 or bfloat16)
  config.yaml      the run's resolved config
  tokenizer.model  the SentencePiece model (and .vocab when present)
  export.json      source run, step and dtype
`load_run(DIR)` reads either kind. `--merge-lora` exports a LoRA run as the plain model:
each adapted kernel W + (alpha/r) A B, and its config with model.lora_rank=0.

Parameters are restored straight into their shards on a mesh (`model_mesh`): no process and
no device ever holds the whole tree, so every command that loads a model works with several
processes and with models larger than one device."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxlm.config import MeshConfig, RunConfig, load_config, to_yaml
from jaxlm.config.version import version_header
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.models import build_model, lora
from jaxlm.parallel.sharding import data_parallel_size, make_mesh
from jaxlm.paths import Path, absolute, as_path, copy_file, is_remote
from jaxlm.train import object_store
from jaxlm.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.train.optimizer import optimizer_for
from jaxlm.train.state import state_shardings

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """A run's config, its parameters (float32, sharded over `mesh`) and its tokenizer."""

    cfg: RunConfig
    params: Any
    tokenizer: Tokenizer
    step: int
    mesh: Mesh


def model_mesh(cfg: RunConfig, devices: list | None = None) -> Mesh:
    """The mesh a loaded model is laid out on: the run's `mesh.*` where it fits here.

    Inference has no context parallelism, so the sequence axis joins fsdp. Where the run's
    sizes don't fit the devices present (a run trained on a pod, evaluated on a laptop),
    the parameters are sharded fsdp-style over every device instead.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    m = cfg.mesh
    if m.sequence == -1:
        m = dataclasses.replace(m, sequence=1, fsdp=-1)
    elif m.sequence != 1:
        fsdp = -1 if m.fsdp == -1 else m.fsdp * m.sequence
        m = dataclasses.replace(m, sequence=1, fsdp=fsdp)
    n_proc = len({d.process_index for d in devices})
    try:
        mesh = make_mesh(m, devices)
        if data_parallel_size(mesh) % n_proc == 0:
            return mesh
    except ConfigError:
        pass
    logger.info(
        f"The run's mesh ({_describe(cfg.mesh)}) does not fit the {len(devices)} devices here; "
        f"its parameters are sharded over all of them (mesh.fsdp={len(devices)})."
    )
    return make_mesh(MeshConfig(data=1, fsdp=-1), devices)


def _describe(m: MeshConfig) -> str:
    return ", ".join(f"{f.name}={getattr(m, f.name)}" for f in dataclasses.fields(m))


def load_run(workdir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> Run:
    """Restore a run directory's checkpoint (newest readable by default) or an export,
    sharded over `mesh` (default: `model_mesh` of the run's config)."""
    workdir = as_path(workdir)
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
    mesh = model_mesh(cfg) if mesh is None else mesh
    if (workdir / EXPORT_INFO).is_file():
        params, saved_step = load_exported(workdir, cfg, mesh)
    else:
        params, saved_step = restore_params(workdir, cfg, step, mesh)
    return Run(cfg=cfg, params=params, tokenizer=tokenizer, step=saved_step, mesh=mesh)


def checkpoint_dir(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(directory for load_run, step): RUN/checkpoints/N becomes (RUN, N)."""
    path = as_path(path, "--checkpoint")
    if path.parent.name == "checkpoints" and path.name.isdigit() and path.is_dir():
        if step is not None and step != int(path.name):
            raise ConfigError(f"--step {step} contradicts the checkpoint '{path}'; drop --step.")
        path, step = path.parent.parent, int(path.name)
    if not path.is_dir():
        raise ConfigError(f"--checkpoint '{path}' is not a directory; give a run or export dir.")
    return path, step


def open_checkpoint(path: str | Path, step: int | None = None, mesh: Mesh | None = None) -> Run:
    """`load_run` for any --checkpoint: a run, an export, a converted model or RUN/checkpoints/N.

    Refuses a tokenizer whose ids would not all fit the model's embedding table.
    """
    run = load_run(*checkpoint_dir(path, step), mesh=mesh)
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


def abstract_params(cfg: RunConfig, mesh: Mesh | None = None) -> tuple[Any, Any]:
    """(abstract train state, abstract params) carrying their shardings on `mesh`
    (default: this process's first device)."""
    if mesh is None:
        mesh = make_mesh(MeshConfig(data=-1), jax.local_devices()[:1])
    tx = optimizer_for(cfg, cfg.train.steps)
    abstract, shardings = state_shardings(build_model(cfg.model), tx, cfg.data.seq_len, mesh)
    abstract = abstract_with_shardings(abstract, shardings)
    return abstract, abstract.params


def restore_params(
    workdir: Path, cfg: RunConfig, step: int | None = None, mesh: Mesh | None = None
) -> tuple[Any, int]:
    """(params, step) of a run's checkpoint, skipping optimizer state; newest readable by
    default; sharded over `mesh`."""
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"'{workdir}' has no checkpoint yet; train it first (jaxlm train).")
    _, abstract = abstract_params(cfg, mesh)
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


def merge_lora(params: Any, cfg: RunConfig, mesh: Mesh) -> tuple[Any, RunConfig]:
    """(params, config) of the plain model a LoRA run's adapters merge into, sharded like it."""
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_rank=0))
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params(plain, mesh)[1])
    merge = jax.jit(lora.merge, static_argnums=1, out_shardings=shardings)
    return merge(params, lora.lora_scale(cfg.model)), plain


def export_params(
    workdir: str | Path,
    output: str | Path,
    step: int | None = None,
    dtype: str = "float32",
    merge_adapters: bool = False,
) -> dict[str, Any]:
    """Write a params-only export of `workdir` into the new directory `output`; with
    `merge_adapters` its LoRA adapters merged into their kernels (`merge_lora`)."""
    workdir, output = as_path(workdir), as_path(output, "--output")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use {' or '.join(EXPORT_DTYPES)}.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output '{output}' already exists and is not empty; name a new one.")
    cfg_path = workdir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{workdir}' holds no config.yaml; pass the --workdir of a jaxlm run.")
    cfg = load_config(cfg_path)
    if merge_adapters and not cfg.model.lora_rank:
        raise ConfigError(
            f"The run in '{workdir}' has model.lora_rank=0, so it has no LoRA adapters to "
            f"merge; drop --merge-lora."
        )
    tok_path = as_path(cfg.data.tokenizer or workdir / "tokenizer.model")
    if not tok_path.is_file():
        raise ConfigError(f"The run's tokenizer '{tok_path}' is missing; it can't be exported.")
    mesh = model_mesh(cfg)
    params, step = restore_params(workdir, cfg, step, mesh)
    if merge_adapters:
        params, cfg = merge_lora(params, cfg, mesh)
    params = jax.tree.map(lambda x: x.astype(dtype), params)

    # Every process writes its own shards through Orbax; process 0 alone builds the directory
    # around them beside its destination and renames it at the end, so a crash leaves no
    # half-written export under the requested name. A bucket has no rename: there the files go
    # straight to `output` and export.json, written last, marks the export complete.
    primary = jax.process_index() == 0
    remote = is_remote(output)
    tmp = output if remote else output.parent / f".{output.name}.partial"
    if primary and not remote:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an interrupted export
        tmp.mkdir()
    _sync("jaxlm-export-start")
    try:
        with object_store.standard_checkpointer(tmp) as checkpointer:
            checkpointer.save(absolute(tmp) / "params", params)
            checkpointer.wait_until_finished()
        n_params = sum(int(x.size) for x in jax.tree.leaves(params))
        info = {"source": str(absolute(workdir)), "step": step, "dtype": dtype}
        info["params"] = n_params
        if merge_adapters:
            info["merged_lora"] = True
        if primary:
            if merge_adapters:
                (tmp / "config.yaml").write_text(version_header() + to_yaml(cfg), "utf-8")
            else:
                copy_file(cfg_path, tmp / "config.yaml")
            for suffix in (".model", ".vocab"):
                src = tok_path.with_suffix(suffix)
                if src.is_file():
                    copy_file(src, tmp / f"tokenizer{suffix}")
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            if not remote:
                if output.exists():
                    output.rmdir()  # empty, checked above
                tmp.rename(output)
        _sync("jaxlm-export-done")
    except BaseException:
        if primary and not remote:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "output": str(output)}


def _sync(name: str) -> None:
    """Wait until every process of the run gets here."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def load_exported(path: Path, cfg: RunConfig, mesh: Mesh | None = None) -> tuple[Any, int]:
    """(float32 params, step) of an export directory, sharded over `mesh`."""
    info = json.loads((path / EXPORT_INFO).read_text(encoding="utf-8"))
    _, abstract = abstract_params(cfg, mesh)
    stored = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(info["dtype"]), sharding=a.sharding),
        abstract,
    )
    with object_store.standard_checkpointer(path) as checkpointer:
        params = checkpointer.restore(absolute(path / "params"), stored)
    return jax.tree.map(lambda x: x.astype(jnp.float32), params), int(info["step"])
