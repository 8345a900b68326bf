"""JAX's splash attention (a Pallas TPU kernel) behind this package's attention layout.

`splash_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, ...)` has the semantics of
`flash_attention.reference_attention` for causal self-attention with packed segments:
a query sees a key of its own segment at an index <= its own (+ q_offset). Grouped-query
heads use splash's MQA kernel once per kv head, so k and v are never repeated.

Splash is JAX's own kernel (the one MaxText trains with), verified on TPUs by its
authors; it runs here only through Mosaic on TPU, or in Pallas's interpreter for tests.
It needs both lengths in whole 128-row blocks, and every query row must see some key
(true of causal self-attention, where each query sees itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

# Largest first: MaxText's 512-row tiles where the length allows, else smaller whole tiles.
BLOCKS = (512, 256, 128)


def block_for(n: int) -> int | None:
    """The largest splash block that divides a sequence length n, or None (not supported)."""
    return next((b for b in BLOCKS if n % b == 0), None)


def supports(q_len: int, kv_len: int) -> bool:
    """Can splash take these lengths (whole 128-row blocks)?"""
    return block_for(q_len) is not None and block_for(kv_len) is not None


def _kernel(q_len: int, kv_len: int, heads: int, mqa: bool, causal: bool, q_offset: int, interpret):
    """A splash kernel for one batch row: `heads` query heads (per kv head when `mqa`)."""
    bq, bk = block_for(q_len), block_for(kv_len)
    blocks = sk.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    shape = (q_len, kv_len)
    one = sm.CausalMask(shape, offset=q_offset) if causal else sm.FullMask(shape)
    make = sk.make_splash_mqa if mqa else sk.make_splash_mha
    return make(
        sm.MultiHeadMask([one] * heads),
        block_sizes=blocks,
        head_shards=1,  # callers shard_map the kernel, so it always sees whole heads
        q_seq_shards=1,
        interpret=interpret,
    )


def splash_attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    *,
    q_segment_ids_BxS: jax.Array | None = None,
    kv_segment_ids_BxT: jax.Array | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    interpret: bool | object = False,
) -> jax.Array:
    """Attention out_BxSxHxE from JAX's splash kernel (differentiable).

    `interpret`: False on TPU; True or `pltpu.InterpretParams()` runs it on CPU for tests.
    """
    b, s, h, e = q_BxSxHxE.shape
    t, kh = k_BxTxKxE.shape[1:3]
    if not supports(s, t):
        raise ValueError(
            f"splash attention needs sequence lengths in whole 128-row blocks, got {s} and {t}"
        )
    if (q_segment_ids_BxS is None) != (kv_segment_ids_BxT is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    g = h // kh
    # Splash takes no scale: fold it into q (exact for power-of-four head dims).
    scale = e**-0.5 if scale is None else scale
    q_BxHxSxE = jnp.swapaxes(q_BxSxHxE, 1, 2) * jnp.asarray(scale, q_BxSxHxE.dtype)
    k_BxKxTxE = jnp.swapaxes(k_BxTxKxE, 1, 2)
    v_BxKxTxE = jnp.swapaxes(v_BxTxKxE, 1, 2)
    kernel = _kernel(s, t, g if kh != h else h, kh != h, bool(causal), int(q_offset), interpret)

    def row(q, k, v, q_seg, kv_seg):
        seg = None if q_seg is None else sk.SegmentIds(q=q_seg, kv=kv_seg)
        if kh == h:  # one multi-head call over H heads
            return kernel(q, k, v, seg)
        q_KxGxSxE = q.reshape(kh, g, s, e)  # one MQA call per kv head and its G query heads
        out = jax.vmap(lambda qg, kk, vv: kernel(qg, kk, vv, seg))(q_KxGxSxE, k, v)
        return out.reshape(h, s, e)

    segs = (q_segment_ids_BxS, kv_segment_ids_BxT)
    if segs[0] is not None:
        segs = tuple(x.astype(jnp.int32) for x in segs)
    out_BxHxSxE = jax.vmap(row)(q_BxHxSxE, k_BxKxTxE, v_BxKxTxE, *segs)
    return jnp.swapaxes(out_BxHxSxE, 1, 2).astype(q_BxSxHxE.dtype)
