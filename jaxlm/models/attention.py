"""Causal self-attention: one kernel interface, several implementations, and the block.

`attend(q, k, v, ...)` is the interface every implementation honours:
  q_BxSxHxE, k_BxTxKxE, v_BxTxKxE with K dividing H (grouped-query heads share k/v),
  segment ids (a query sees only keys of its own segment: packed documents stay apart)
  and causality by index, shifted by `q_offset` when queries continue a cache.
Implementations: `reference` (plain jnp, float32 softmax, the ground truth for tests),
`xla` (`jax.nn.dot_product_attention`), `dense` (plain jnp laid out for CPU speed),
`cudnn` (the same call's cuDNN fused kernel, GPU only), `splash` (JAX's splash kernel,
TPU only), `pallas` (our flash kernel, `jaxlm.kernels.flash_attention`: opt-in, compiled
for GPU/TPU but not yet run on either) and `auto`: the fastest one verified on the target,
i.e. cudnn on NVIDIA GPUs, splash on TPUs, dense on CPU (see docs/attention.md). The target
is the platform of the ambient mesh's devices, so an ahead-of-time compile for a TPU
topology on a CPU host picks TPU kernels. Under a mesh the kernels run per shard: batch
over data/fsdp, heads over tensor. KV-cache decoding (a traced `q_offset`) always takes
`xla`: one query row per step needs no flash kernel.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlm.config import ModelConfig
from jaxlm.kernels.flash_attention import reference_attention as kernel_reference
from jaxlm.models.attention_kernels import SEGMENT_IMPLEMENTATIONS, auto_impl, check_impl
from jaxlm.models.backend import target_backend, uses
from jaxlm.models.context_attention import context_attention
from jaxlm.models.layers import Dense, Kernel, dtype_of, rotary, stacked_dense
from jaxlm.models.lm import out_init_std
from jaxlm.models.lora import add_lora, lora_rank, lora_scale
from jaxlm.models.scan import ATTENTION_OUT, QKV


def attention_mask(
    q_segment_ids_BxS: jax.Array,
    kv_segment_ids_BxT: jax.Array,
    causal: bool,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """Boolean mask_Bx1xSxT: same segment and (if causal) key index <= query index."""
    mask = q_segment_ids_BxS[:, :, None] == kv_segment_ids_BxT[:, None, :]
    if causal:
        s, t = q_segment_ids_BxS.shape[1], kv_segment_ids_BxT.shape[1]
        q_idx = jnp.arange(s)[:, None] + q_offset
        mask = mask & (jnp.arange(t)[None, :] <= q_idx)[None]
    return mask[:, None]


def reference_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask_Bx1xSxT, scale: float):
    """The kernels' float32 ground truth under this module's mask; simple and exact."""
    return kernel_reference(
        q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, causal=False, scale=scale, mask_BxSxT=mask_Bx1xSxT[:, 0]
    )


def xla_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask_Bx1xSxT, scale: float):
    """`jax.nn.dot_product_attention` with the XLA backend (handles grouped heads itself)."""
    return jax.nn.dot_product_attention(
        q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask=mask_Bx1xSxT, scale=scale, implementation="xla"
    )


def dense_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask_Bx1xSxT, scale: float):
    """Plain jnp in the heads-major [B, H, S, E] layout, normalised after the value matmul.

    On CPU this beats `xla` (about 3% of a whole bench-cpu train step): batch dims lead in
    both matmuls, and dividing the [S, E] output by the softmax sums instead of the [S, T]
    probabilities does E/T of the divisions.
    """
    h, kh = q_BxSxHxE.shape[2], k_BxTxKxE.shape[2]
    if kh != h:  # grouped-query heads: each kv head serves h // kh query heads
        k_BxTxKxE = jnp.repeat(k_BxTxKxE, h // kh, axis=2)
        v_BxTxKxE = jnp.repeat(v_BxTxKxE, h // kh, axis=2)
    q_BxHxSxE = jnp.swapaxes(q_BxSxHxE, 1, 2) * jnp.asarray(scale, q_BxSxHxE.dtype)
    k_BxHxTxE = jnp.swapaxes(k_BxTxKxE, 1, 2)
    v_BxHxTxE = jnp.swapaxes(v_BxTxKxE, 1, 2)
    logits = jnp.einsum("bhse,bhte->bhst", q_BxHxSxE, k_BxHxTxE, preferred_element_type=jnp.float32)
    logits = jnp.where(mask_Bx1xSxT, logits, jnp.finfo(jnp.float32).min)
    # Any per-row shift gives the same softmax; the max only keeps exp in range.
    shift_BxHxSx1 = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p_BxHxSxT = jnp.exp(logits - shift_BxHxSx1)
    sum_BxHxSx1 = jnp.sum(p_BxHxSxT, axis=-1, keepdims=True)
    out_BxHxSxE = jnp.einsum(
        "bhst,bhte->bhse",
        p_BxHxSxT.astype(v_BxHxTxE.dtype),
        v_BxHxTxE,
        preferred_element_type=jnp.float32,
    )
    out_BxHxSxE = out_BxHxSxE / sum_BxHxSx1
    return jnp.swapaxes(out_BxHxSxE, 1, 2).astype(q_BxSxHxE.dtype)


IMPLEMENTATIONS = {
    "reference": reference_attention,
    "xla": xla_attention,
    "dense": dense_attention,
}


def attend(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    *,
    q_segment_ids_BxS: jax.Array,
    kv_segment_ids_BxT: jax.Array,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    impl: str = "xla",
    scale: float | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Attention output_BxSxHxE through the named implementation.

    `backend` (cpu | gpu | tpu | tpu_interpret): the platform to pick and lower kernels
    for; None: `target_backend()`.
    """
    known = {*IMPLEMENTATIONS, *SEGMENT_IMPLEMENTATIONS, "auto"}
    if impl not in known:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of {sorted(known)}")
    h, kh = q_BxSxHxE.shape[2], k_BxTxKxE.shape[2]
    if h % kh:
        raise ValueError(f"{kh} kv heads do not divide {h} query heads")
    scale = q_BxSxHxE.shape[-1] ** -0.5 if scale is None else scale
    backend = backend or target_backend()
    if impl == "auto":
        s, t, e = q_BxSxHxE.shape[1], k_BxTxKxE.shape[1], q_BxSxHxE.shape[3]
        impl = auto_impl(backend, q_BxSxHxE.dtype, e, s, t)
    check_impl(impl, backend)
    if impl in SEGMENT_IMPLEMENTATIONS:
        if isinstance(q_offset, int):
            return SEGMENT_IMPLEMENTATIONS[impl](
                q_BxSxHxE,
                k_BxTxKxE,
                v_BxTxKxE,
                q_segment_ids_BxS,
                kv_segment_ids_BxT,
                causal,
                q_offset,
                scale,
                backend,
            )
        impl = "xla"  # KV-cache decoding: the offset is only known at run time
    mask = attention_mask(q_segment_ids_BxS, kv_segment_ids_BxT, causal, q_offset)
    if (
        impl == "dense"
        and causal
        and isinstance(q_offset, int)
        and q_offset == 0
        and uses("blocked_causal")
    ):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:  # slicing a sharded batch or length would reshard
            s = q_BxSxHxE.shape[1]
            return blocked_causal_attention(
                q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask, scale, query_blocks=min(4, s // 128)
            )
    return IMPLEMENTATIONS[impl](q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask, scale)


def blocked_causal_attention(
    q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, mask_Bx1xSxS, scale: float, query_blocks: int = 2
):
    """`dense_attention` of causal self-attention cut into independent pieces for the CPU.

    Query block i (of `query_blocks` equal blocks) only attends to keys up to its own end,
    so the score matrices skip most of the masked upper triangle: 2 blocks compute 3/4 of
    the full S x S, 4 blocks 5/8. The batch is also split in two halves. XLA's CPU runtime
    runs a batched matmul on one thread but runs independent operations concurrently, so
    the halves keep both cores of a small machine busy. Every row sees exactly the keys it
    saw before; only the work on fully masked keys is gone. On the bench-cpu model (S 256)
    this made the whole train step about 4% faster than one `dense_attention` call.
    """
    b, s = q_BxSxHxE.shape[:2]
    if s != k_BxSxKxE.shape[1] or query_blocks < 1 or s % query_blocks:
        query_blocks = 1
    halves = 2 if b % 2 == 0 else 1
    size, rows = s // query_blocks, b // halves
    outs = []
    for j in range(halves):
        r = slice(j * rows, (j + 1) * rows)
        for i in range(query_blocks):
            qs, end = slice(i * size, (i + 1) * size), (i + 1) * size
            outs.append(
                dense_attention(
                    q_BxSxHxE[r, qs],
                    k_BxSxKxE[r, :end],
                    v_BxSxKxE[r, :end],
                    mask_Bx1xSxS[r, :, qs, :end],
                    scale,
                )
            )
    by_half = [
        jnp.concatenate(outs[j : j + query_blocks], axis=1)
        for j in range(0, len(outs), query_blocks)
    ]
    return jnp.concatenate(by_half, axis=0)


class Attention(nn.Module):
    """Multi-head (grouped-query) causal self-attention with optional rotary positions.

    With `decode=True` keys and values are appended to a `cache` collection sized by the
    sequence length seen at `init`, so generation costs one new row of attention per token.
    """

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS, deterministic: bool = True):
        cfg = self.cfg
        h, k, e = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        dtype = dtype_of(cfg.dtype)
        d, scale = x_BxSxD.shape[-1], lora_scale(cfg)
        proj = lambda n, axes, name, t: Kernel(  # noqa: E731
            (d,), (n, e), axes, cfg.bias, cfg.init_std, lora_rank(cfg, t), name=name
        )()
        wq, bq, aq = proj(h, ("embed", "heads", "head_dim"), "query", "q")
        wk, bk, ak = proj(k, ("embed", "kv_heads", "head_dim"), "key", "k")
        wv, bv, av = proj(k, ("embed", "kv_heads", "head_dim"), "value", "v")
        if h == k:  # one matmul for q, k and v (grouped-query shapes differ: keep three)
            q_BxSxHxE, k_BxSxKxE, v_BxSxKxE = stacked_dense(
                x_BxSxD, [wq, wk, wv], [bq, bk, bv], dtype
            )
        else:
            (q_BxSxHxE,), (k_BxSxKxE, v_BxSxKxE) = (
                stacked_dense(x_BxSxD, [wq], [bq], dtype),
                stacked_dense(x_BxSxD, [wk, wv], [bk, bv], dtype),
            )
        q_BxSxHxE = add_lora(q_BxSxHxE, x_BxSxD, aq, scale, dtype)
        k_BxSxKxE = add_lora(k_BxSxKxE, x_BxSxD, ak, scale, dtype)
        v_BxSxKxE = add_lora(v_BxSxKxE, x_BxSxD, av, scale, dtype)
        if cfg.position == "rope":
            q_BxSxHxE = rotary(q_BxSxHxE, positions_BxS, cfg.rope_theta)
            k_BxSxKxE = rotary(k_BxSxKxE, positions_BxS, cfg.rope_theta)
        q_BxSxHxE = nn.with_logical_constraint(q_BxSxHxE, ("batch", "length", "act_heads", None))
        q_BxSxHxE = checkpoint_name(q_BxSxHxE, QKV[0])
        k_BxSxKxE = checkpoint_name(k_BxSxKxE, QKV[1])
        v_BxSxKxE = checkpoint_name(v_BxSxKxE, QKV[2])

        q_offset, kv_segment_ids = 0, segment_ids_BxS
        if self.decode:
            k_BxSxKxE, v_BxSxKxE, kv_segment_ids, q_offset = self._extend_cache(
                k_BxSxKxE, v_BxSxKxE, segment_ids_BxS
            )
        context = getattr(cfg, "context_parallel", "none")
        if context != "none" and not self.decode:  # the sequence split over mesh.sequence
            out_BxSxHxE = context_attention(
                q_BxSxHxE,
                k_BxSxKxE,
                v_BxSxKxE,
                segment_ids_BxS,
                strategy=context,
                backend=target_backend(),
            )
        else:
            out_BxSxHxE = attend(
                q_BxSxHxE,
                k_BxSxKxE,
                v_BxSxKxE,
                q_segment_ids_BxS=segment_ids_BxS,
                kv_segment_ids_BxT=kv_segment_ids,
                causal=True,
                q_offset=q_offset,
                impl=cfg.attention,
            )
        out_BxSxHxE = checkpoint_name(out_BxSxHxE, ATTENTION_OUT)
        out_std = out_init_std(cfg)
        out_BxSxD = Dense(
            cfg.d_model,
            ("heads", "head_dim", "embed"),
            axis=(-2, -1),
            use_bias=cfg.bias,
            std=out_std,
            dtype=dtype,
            lora_rank=lora_rank(cfg, "o"),
            lora_scale=scale,
            name="out",
        )(out_BxSxHxE)
        return nn.Dropout(cfg.dropout)(out_BxSxD, deterministic=deterministic)

    def _extend_cache(self, k_BxSxKxE, v_BxSxKxE, segment_ids_BxS):
        """Write this call's keys/values at the cache index; return the whole cache."""
        initialised = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k_BxSxKxE.shape, k_BxSxKxE.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v_BxSxKxE.shape, v_BxSxKxE.dtype)
        cs = self.variable(
            "cache", "cached_segment_ids", jnp.zeros, segment_ids_BxS.shape, jnp.int32
        )
        idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:  # init only sizes the cache
            return k_BxSxKxE, v_BxSxKxE, segment_ids_BxS, 0
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxSxKxE, (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxSxKxE, (0, i, 0, 0))
        cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids_BxS.astype(jnp.int32), (0, i))
        idx.value = i + k_BxSxKxE.shape[1]
        return ck.value, cv.value, cs.value, i
