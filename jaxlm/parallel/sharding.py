"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names in the models; this module is
the only place that decides how those names land on hardware. Changing the parallelism of
a run is a change of `mesh.*` sizes in the config, never of model code.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.config import MeshConfig, RunConfig
from jaxlm.errors import ConfigError

# `expert` is last, so an expert group is the innermost (nearest) devices. Outside the MoE
# layers it splits the batch like data: an expert-parallel mesh wastes no device on the
# dense layers, and at size 1 it changes nothing.
MESH_AXES = ("data", "fsdp", "tensor", "sequence", "expert")
BATCH_AXES = ("data", "fsdp", "expert")
# The mesh axes that may span slices/nodes, and the mesh.* key of their slow (DCN) factor.
DCN_KEYS = {"data": "dcn_data", "fsdp": "dcn_fsdp"}

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
    ("rnn", "tensor"),  # recurrent state width (LSTM/GRU/RG-LRU channels)
    ("expert", "expert"),  # the experts of a MoE layer (jaxlm.models.moe)
    ("lora", None),  # the rank of a LoRA adapter (jaxlm.models.lora): small, replicated
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_rnn", "tensor"),
    ("act_expert", "expert"),
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
    for axis, key in DCN_KEYS.items():
        if sizes[axis] % getattr(cfg, key):
            raise ConfigError(
                f"mesh.{key}={getattr(cfg, key)} does not divide the {sizes[axis]} devices of "
                f"the {axis} axis; make mesh.{axis} a multiple of {getattr(cfg, key)}."
            )
    return sizes


def dcn_shape(cfg: MeshConfig) -> tuple[int, ...]:
    """How many granules each mesh axis spans (its outer, slow factor), in MESH_AXES order."""
    return tuple(getattr(cfg, DCN_KEYS[a]) if a in DCN_KEYS else 1 for a in MESH_AXES)


def granules(devices: list) -> tuple[str, int]:
    """What the devices' granules are ('slices' or 'processes') and how many there are.

    TPU devices know their slice; elsewhere (CPU, GPU), and on a single slice, the units
    across the slow network are the processes.
    """
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        return "slices", len(slices)
    return "processes", len({d.process_index for d in devices})


def hybrid_devices(sizes: dict[str, int], dcn: tuple[int, ...], devices: list) -> np.ndarray:
    """The devices as a mesh grid in which each granule is one contiguous block.

    An axis of size n with dcn factor k is k granules of n/k devices each, the granule
    index outermost: collectives over the inner part (fsdp's all-gathers when dcn_fsdp=1)
    stay on the fast interconnect, and only the dcn part crosses the slow network.
    """
    kind, n = granules(devices)
    if math.prod(dcn) != n:
        raise ConfigError(
            f"mesh.dcn_data*mesh.dcn_fsdp={math.prod(dcn)} but the number of {kind} "
            f"(granules across the data-centre network) is {n}; make that product {n}."
        )
    ici = tuple(sizes[a] // k for a, k in zip(MESH_AXES, dcn, strict=True))
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(d.slice_index if kind == "slices" else d.process_index, []).append(d)
    counts = sorted({len(g) for g in groups.values()})
    if counts != [math.prod(ici)]:
        raise ConfigError(
            f"The {n} {kind} hold {' or '.join(map(str, counts))} devices each but the mesh "
            f"needs {math.prod(ici)} in each; give them all the same number of devices."
        )
    try:
        return mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=kind == "processes"
        )
    except (ValueError, NotImplementedError):  # shapes the topology helper can't place
        grid = np.empty([k * i for k, i in zip(dcn, ici, strict=True)], dtype=object)
        for at, key in zip(np.ndindex(*dcn), sorted(groups), strict=True):
            block = tuple(slice(g * i, (g + 1) * i) for g, i in zip(at, ici, strict=True))
            grid[block] = np.asarray(groups[key], dtype=object).reshape(ici)
        return grid


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A Mesh with Auto axes (GSPMD style) over all devices of all processes.

    With mesh.dcn_* > 1, or on devices of several TPU slices, the devices are laid out by
    `hybrid_devices` so that each slice or node is one block of the grid.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = dcn_shape(cfg)
    if math.prod(dcn) > 1 or granules(devices)[0] == "slices":
        grid = hybrid_devices(sizes, dcn, devices)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
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
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` (abstract or real).

    A dimension its mesh axes can't split evenly is replicated instead. `validate_mesh`
    refuses every such case up front except one it allows on purpose: fewer key/value
    heads than `tensor` devices (grouped-query attention), where each tensor shard keeps
    all kv heads, as Megatron does.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
    return jax.tree.map(
        lambda s, leaf: _fit(s, np.shape(nn.unbox(leaf))),
        shardings,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """Drop the mesh axes of every dimension they don't divide."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    fitted = tuple(
        axes if n % _axes_size(sharding.mesh, axes) == 0 else None
        for n, axes in zip(shape, spec, strict=True)
    )
    return sharding if fitted == spec else NamedSharding(sharding.mesh, P(*fitted))


def _axes_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


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
            f"{per_micro} rows, which the {dp} data-parallel devices (mesh data*fsdp*expert) "
            f"can't divide; use a batch size that is a multiple of {dp * microbatches}."
        )


def validate_mesh(cfg: RunConfig, mesh: Mesh) -> None:
    """Refuse sizes the mesh axes can't split evenly, one sentence each, before compiling."""
    m, sizes = cfg.model, dict(mesh.shape)
    check_divisibility(mesh, cfg.train.batch_size, cfg.train.microbatches)
    if isinstance(mesh, Mesh):  # the processes (or a topology's hosts) share rows evenly
        data_shards(mesh)  # cached: the loop's put_batch asks again
    checks = [
        ("model.vocab_size", m.vocab_size, "tensor"),
        ("model.d_model", m.d_model, "fsdp"),
        ("data.seq_len", cfg.data.seq_len, "sequence"),
    ]
    if not getattr(m, "recurrent", False):  # recurrent layers have no heads to split
        checks += [("model.n_heads", m.n_heads, "tensor"), ("model.d_ff", m.ff_dim, "tensor")]
    if getattr(m, "moe_experts", 0):
        checks += [("model.moe_experts", m.moe_experts, "expert")]
        checks += [("model.moe_d_ff", m.moe_ff_dim, "tensor")]
    for name, value, axis in checks:
        if value % sizes[axis]:
            raise ConfigError(
                f"{name}={value} can't be split evenly over mesh.{axis}={sizes[axis]}; "
                f"make {name} a multiple of {sizes[axis]} or change mesh.{axis}."
            )
    # kv_heads % tensor != 0 is allowed: logical_sharding replicates those heads instead.
    cp, seq = getattr(m, "context_parallel", "none"), sizes["sequence"]
    if cp != "none" and cfg.data.seq_len % (2 * seq):
        raise ConfigError(
            f"model.context_parallel={cp} cuts each sequence into 2*mesh.sequence={2 * seq} "
            f"zig-zag chunks, which data.seq_len={cfg.data.seq_len} does not divide; make "
            f"data.seq_len a multiple of {2 * seq}."
        )


@functools.lru_cache(maxsize=16)  # put_batch asks every step; the answer is the mesh's
def data_shards(mesh: Mesh) -> tuple[int, int]:
    """(count, index): how many different blocks of each batch's rows the processes load,
    and which block this process loads.

    Usually every process holds its own rows (count = process count). Where the sequence or
    tensor axis spans processes, several processes hold the same rows (each its part of
    the sequence or of the heads): they load the same block, and the rows they all hold
    are one block.
    """
    blocks, held = _row_blocks(mesh)
    return len(blocks), blocks.index(held[jax.process_index()])


def _row_blocks(mesh: Mesh) -> tuple[list[frozenset[int]], dict[int, frozenset[int]]]:
    """The distinct sets of data-parallel groups the processes hold (ordered), and each
    process's set; refused unless every process holds the same number of whole groups
    that no process outside its block shares."""
    dp = data_parallel_size(mesh)
    held: dict[int, set[int]] = {}
    rows = NamedSharding(mesh, P(BATCH_AXES)).devices_indices_map((dp,))
    for device, (index,) in rows.items():
        held.setdefault(device.process_index, set()).add(index.start or 0)
    blocks = sorted({frozenset(r) for r in held.values()}, key=min)
    if sum(len(b) for b in blocks) != dp or len({len(b) for b in blocks}) != 1:
        shares = sorted(sorted(r) for r in held.values())
        raise ConfigError(
            f"The mesh {dict(mesh.shape)} splits the batch rows unevenly over the processes "
            f"(they hold the data-parallel groups {shares}); choose mesh.tensor and "
            f"mesh.sequence so that the devices sharing rows lie within one process or span "
            f"whole processes."
        )
    return blocks, {p: frozenset(r) for p, r in held.items()}


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the batch axes (arrays
    of any rank: their first axis is the row). Processes holding the same rows pass the
    same block (`data_shards`)."""
    count = data_shards(mesh)[0]
    return {
        k: jax.make_array_from_process_local_data(
            NamedSharding(mesh, P(BATCH_AXES, *[None] * (v.ndim - 1))),
            v,
            (v.shape[0] * count,) + v.shape[1:],
        )
        for k, v in batch.items()
    }


def process_rows(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
    """This process's block of rows of a global batch (what put_batch takes)."""
    count, index = data_shards(mesh)
    if count == 1:
        return batch
    n = next(iter(batch.values())).shape[0] // count
    return {k: v[index * n : (index + 1) * n] for k, v in batch.items()}
