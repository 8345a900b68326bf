"""Memory per device of one attention layer's forward + backward under context parallelism.

For each number n of `sequence` devices (the rest of the mesh at 1), the forward and
backward of attention over a sequence of `seq_len` tokens split n ways is compiled, not
run, and XLA's `memory_analysis()` gives the temporary bytes per device. With
`context_parallel=none` (the Pallas kernel per shard, which gathers q, k, v along the
sequence) every device holds the whole sequence's attention; `ring` and `all_gather` keep
a device's share near 1/n of it (all_gather still holds the whole K/V once). On CPU the
devices can be fake (XLA_FLAGS=--xla_force_host_platform_device_count=8) and the Pallas
kernels are lowered in interpret mode, so the absolute numbers are the CPU interpreter's;
the trend over n is the point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.bench import report
from jaxlm.config import MeshConfig
from jaxlm.errors import ConfigError
from jaxlm.models.attention import attend
from jaxlm.models.context_attention import context_attention
from jaxlm.parallel.sharding import make_mesh, mesh_context

STRATEGIES = ("none", "all_gather", "ring")
MIB = 2**20
COLUMNS: list[report.Column] = [
    ("strategy", "strategy", "s"),
    ("sequence devices", "shards", "d"),
    ("tokens per device", "local_tokens", "d"),
    ("temp MiB per device", "temp_mib", ".1f"),
    ("argument MiB", "argument_mib", ".1f"),
    ("temp x n / temp at n=1", "scaling", ".2f"),
]


@dataclasses.dataclass(frozen=True)
class Shape:
    """The attention layer measured: batch, sequence, heads, kv heads, head dim, dtype."""

    batch: int = 1
    seq_len: int = 32768
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "bfloat16"


def layer_memory(shape: Shape, shards: int, strategy: str) -> dict[str, Any]:
    """Compiled per-device memory of attention forward + backward over `shards` devices."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}.")
    if shards > jax.device_count():
        raise ConfigError(
            f"{shards} sequence devices asked for but JAX sees {jax.device_count()}; on CPU "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={shards}."
        )
    if shape.seq_len % (2 * shards):
        raise ConfigError(f"seq_len={shape.seq_len} must be a multiple of 2*{shards}.")
    mesh = make_mesh(MeshConfig(data=1, sequence=shards), jax.devices()[:shards])
    dtype = jnp.dtype(shape.dtype)
    seq = NamedSharding(mesh, P(None, "sequence"))
    b, s = shape.batch, shape.seq_len

    def spec(*dims, dt=dtype):
        return jax.ShapeDtypeStruct(dims, dt, sharding=seq)

    args = (
        spec(b, s, shape.heads, shape.head_dim),
        spec(b, s, shape.kv_heads, shape.head_dim),
        spec(b, s, shape.kv_heads, shape.head_dim),
        spec(b, s, dt=jnp.int32),
    )

    def loss(q, k, v, seg):
        with mesh_context(mesh):
            if strategy == "none":
                out = attend(q, k, v, q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, impl="pallas")
            else:
                out = context_attention(q, k, v, seg, strategy=strategy)
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
    mem = report.memory_analysis(compiled) or {}
    return {
        "strategy": strategy,
        "shards": shards,
        "local_tokens": s // shards,
        "temp_mib": mem.get("temp", 0) / MIB,
        "argument_mib": mem.get("argument", 0) / MIB,
    }


def memory_table(
    shape: Shape, shards: Sequence[int] = (1, 2, 4, 8), strategies: Sequence[str] = STRATEGIES
) -> list[dict[str, Any]]:
    """One row per (strategy, n); `scaling` is temp * n / temp at n = 1 (1.0: exactly 1/n)."""
    rows = []
    for strategy in strategies:
        base = None
        for n in shards:
            row = layer_memory(shape, n, strategy)
            base = row["temp_mib"] if base is None and n == 1 else base
            row["scaling"] = row["temp_mib"] * n / base if base else None
            rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    right = [title for title, _, spec in COLUMNS if spec != "s"]
    return report.table(COLUMNS, rows, right=right)
