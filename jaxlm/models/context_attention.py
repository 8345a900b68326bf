"""Context-parallel attention (`model.context_parallel`) under the ambient mesh.

q, k, v arrive sharded along their length over the mesh's `sequence` axis and laid out
zig-zag (device i holds chunks i and 2n-1-i of 2n; the train step permutes each batch that
way, jaxlm.train.step), so attention runs on each device's own slice: `ring` passes K/V
around the sequence devices, `all_gather` gathers them once (jaxlm.kernels.ring_attention).
The batch splits over the data axes and heads over `tensor`, as for the other kernels.
Without a sequence axis (one device, or inference's meshes) the zig-zag order of one chunk
pair is the natural order, and plain causal flash attention is the same computation.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from jaxlm.kernels.ring_attention import gathered_attention, ring_attention
from jaxlm.kernels.tiled_attention import long_flash_attention
from jaxlm.parallel.sharding import BATCH_AXES

STRATEGIES = {"ring": ring_attention, "all_gather": gathered_attention}
SEQUENCE = "sequence"  # the mesh axis the sequence is split over


def context_attention(
    q_BxSxHxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    segment_ids_BxS: jax.Array,
    *,
    strategy: str,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
    tile_len: int | None = None,
) -> jax.Array:
    """Self-attention output_BxSxHxE of a zig-zag laid-out sequence, by `strategy`.
    `tile_len` bounds the tokens of one kernel call (None: what the backend holds)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"context parallelism {strategy!r} is unknown; use one of {STRATEGIES}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(SEQUENCE, 1) == 1:
        return _per_batch_shard(
            lambda q, k, v, s: long_flash_attention(  # noqa: E731
                q,
                k,
                v,
                q_segment_ids_BxS=s,
                kv_segment_ids_BxT=s,
                causal=causal,
                scale=scale,
                backend=backend,
                tile_len=tile_len,
            ),
            mesh,
            q_BxSxHxE,
            k_BxSxKxE,
            v_BxSxKxE,
            segment_ids_BxS,
        )
    kernel = STRATEGIES[strategy]
    fn = lambda q, k, v, s: kernel(  # noqa: E731
        q,
        k,
        v,
        s,
        s,
        axis_name=SEQUENCE,
        causal=causal,
        scale=scale,
        backend=backend,
        tile_len=tile_len,
    )
    return _per_batch_shard(fn, mesh, q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxS, SEQUENCE)


def _per_batch_shard(fn, mesh, q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, seg_BxS, length=None):
    """`fn` on each device's block: batch over the data axes, length over `length`, heads
    over `tensor` (axes that don't divide an array leave it whole on that axis)."""
    if mesh.empty or mesh.size == 1:
        return fn(q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, seg_BxS)
    batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
    if not batch or q_BxSxHxE.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = None
    tp = mesh.shape.get("tensor", 1)
    split = tp > 1 and not q_BxSxHxE.shape[2] % tp and not k_BxSxKxE.shape[2] % tp
    heads = "tensor" if split else None
    spec_4d, spec_2d = P(batch, length, heads, None), P(batch, length)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(spec_4d, spec_4d, spec_4d, spec_2d),
        out_specs=spec_4d,
        check_vma=False,  # pallas_call outputs carry no varying-axes type
    )(q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, seg_BxS)
