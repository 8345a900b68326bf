"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names in the models; this module is
the only place that decides how those names land on hardware. Changing the parallelism of
a run is a change of `mesh.*` sizes in the config, never of model code.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or axes, or None = replicated). Parameter axes first, then
# activation axes (prefixed `act_` where the same concept is laid out differently).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve the -1 axis and check the sizes multiply to the device count."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    auto = [a for a, v in sizes.items() if v == -1]
    if auto:
        if n_devices % fixed:
            raise ConfigError(
                f"The fixed mesh axes multiply to {fixed}, which does not divide the "
                f"{n_devices} available devices; change the mesh.* sizes."
            )
        sizes[auto[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if total != n_devices:
        desc = ", ".join(f"{a}={v}" for a, v in sizes.items())
        raise ConfigError(
            f"The mesh ({desc}) has {total} devices but {n_devices} are available; make the "
            f"mesh.* sizes multiply to {n_devices} (or set one of them to -1)."
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A Mesh with Auto axes (GSPMD style) over all devices of all processes."""
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return jax.make_mesh(
            shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
        )
    except (ValueError, NotImplementedError):  # odd device counts the topology helper rejects
        return Mesh(
            np.asarray(devices).reshape(shape),
            MESH_AXES,
            axis_types=(AxisType.Auto,) * len(MESH_AXES),
        )


def mesh_context(mesh: Mesh):
    """Make `mesh` the ambient (abstract) mesh inside a trace.

    Flax's logical constraints look for it there; `jax.set_mesh` may not be entered inside
    `jit`, the abstract mesh may.
    """
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def logical_sharding(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` (abstract or real)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a [batch, length] array split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_divisibility(mesh: Mesh, global_batch: int, microbatches: int) -> None:
    """Refuse batch sizes the data-parallel axes can't split evenly (before compiling)."""
    dp = data_parallel_size(mesh)
    per_micro = global_batch // microbatches
    if per_micro % dp:
        raise ConfigError(
            f"train.batch_size={global_batch} split into {microbatches} microbatches gives "
            f"{per_micro} rows, which the {dp} data-parallel devices (mesh data*fsdp) can't "
            f"divide; use a batch size that is a multiple of {dp * microbatches}."
        )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n_proc,) + v.shape[1:])
        for k, v in batch.items()
    }
