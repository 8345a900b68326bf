"""Flash attention: tiled online-softmax attention in Pallas, differentiable, no S x T matrix.

`flash_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, ...)` takes the layout of
`jaxlm.models.attention.attend` and returns out_BxSxHxE. The forward kernel keeps only
the log-sum-exp of each query row (B x H x S floats); the backward kernels recompute
scores block by block to produce dq, dk and dv. For attention split over key blocks
(ring attention), `flash_attention_lse` returns that log-sum-exp beside a float32 output,
and `flash_attention_backward` gives one query-block/key-block pair's gradients.

Semantics (identical to `reference_attention` below):
- a query sees a key when their segment ids are equal and, if causal, when
  key index <= query index + q_offset. jaxlm marks padding as segment 0, so padding
  queries attend to padding keys, exactly as the model's reference does;
- a query that sees no key at all gets output 0 and gradient 0 (never NaN);
- K kv heads serve H query heads in groups of G = H / K; k and v are never repeated;
- softmax and accumulation in float32 whatever the input dtype (float32, bfloat16).

Lowering: CPU runs the kernels with `interpret=True`; GPU uses the Pallas Triton backend
(`backend="gpu"`); TPU uses Mosaic (`backend="tpu"`); `backend="tpu_interpret"` runs the
Mosaic kernels in Pallas's TPU interpreter on CPU (TPU memory semantics, for tests). The
backend is the one of the devices compiled for, which a caller compiling ahead of time
for another platform passes explicitly. See `flash_kernels` for the kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxlm.kernels import flash_kernels
from jaxlm.kernels.flash_kernels import EMPTY_LSE as EMPTY
from jaxlm.kernels.flash_kernels import Plan

BACKENDS = ("cpu", "gpu", "tpu", "tpu_interpret")
# Smallest block per backend: Triton's dot wants >= 16 rows, Mosaic's lanes are 128 wide.
MIN_BLOCK = {"cpu": 8, "gpu": 16, "tpu": 128, "tpu_interpret": 128}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per query / key block for the forward and backward kernels, and GPU launch knobs."""

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128
    num_warps: int | None = None  # Triton only; None: 4 for head dim <= 64, else 8
    num_stages: int | None = None  # Triton only; None: Triton's default


# Starting points, not tuned on hardware (no accelerator was available when written):
# FlashAttention-2's Triton settings on GPU; one MXU-shaped tile on TPU; few, large
# grid steps on CPU, where interpret mode pays per step.
DEFAULT_BLOCKS = {
    "cpu": BlockSizes(128, 128, 128, 128),
    "gpu": BlockSizes(128, 64, 64, 64, num_stages=2),
    "tpu": BlockSizes(128, 128, 128, 128),
    "tpu_interpret": BlockSizes(128, 128, 128, 128),
}


def resolve_backend(backend: str | None = None) -> str:
    """cpu | gpu | tpu | tpu_interpret: the given one (the target's, when compiling ahead
    of time for other devices), else that of JAX's default device."""
    name = backend or jax.default_backend()
    name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"flash attention backend {name!r} is unknown; use one of {BACKENDS}")
    return name


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fit(block: int, n: int, backend: str, name: str) -> int:
    """Shrink a block to the (power-of-two-rounded) sequence length, but not below the
    backend's minimum; check it is a power of two."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"{name}={block} must be a positive power of two, e.g. 64 or 128")
    return max(MIN_BLOCK[backend], min(block, _pow2_at_least(n)))


def _check(q, k, v, q_seg, kv_seg, q_offset) -> None:
    """Raise one clear sentence for inputs the kernel cannot take."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(
            f"flash attention wants q BxSxHxE and k, v BxTxKxE, got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{k.shape[2]} kv heads do not divide {q.shape[2]} query heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset={q_offset!r} must be a non-negative Python int")


def flash_attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    *,
    q_segment_ids_BxS: jax.Array | None = None,
    kv_segment_ids_BxT: jax.Array | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Attention out_BxSxHxE computed by the Pallas flash kernels (differentiable)."""
    plan, args = _prepare(
        q_BxSxHxE,
        k_BxTxKxE,
        v_BxTxKxE,
        q_segment_ids_BxS,
        kv_segment_ids_BxT,
        causal,
        q_offset,
        scale,
        block_sizes,
        backend,
    )
    s, e = q_BxSxHxE.shape[1], q_BxSxHxE.shape[3]
    return jnp.swapaxes(_flash(*args, plan)[:, :, :s, :e], 1, 2)


def _prepare(
    q_BxSxHxE,
    k_BxTxKxE,
    v_BxTxKxE,
    q_seg_BxS,
    kv_seg_BxT,
    causal,
    q_offset,
    scale,
    block_sizes,
    backend,
    f32_out: bool = False,
) -> tuple[Plan, tuple]:
    """The kernels' Plan and their inputs: padded, head-major q, k, v and segment ids."""
    _check(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT, q_offset)
    b, s, h, e = q_BxSxHxE.shape
    t, kh = k_BxTxKxE.shape[1:3]
    backend = resolve_backend(backend)
    blocks = block_sizes or DEFAULT_BLOCKS[backend]
    bq, bk, bqb, bkb = (
        _fit(getattr(blocks, n), length, backend, n)
        for n, length in (("block_q", s), ("block_k", t), ("block_q_bwd", s), ("block_k_bwd", t))
    )
    plan = Plan(
        scale=float(e**-0.5 if scale is None else scale),
        causal=bool(causal),
        q_offset=q_offset,
        q_len=s,
        kv_len=t,
        groups=h // kh,
        block_q=bq,
        block_k=bk,
        block_q_bwd=bqb,
        block_k_bwd=bkb,
        segmented=q_seg_BxS is not None,
        backend=backend,
        num_warps=blocks.num_warps or (4 if e <= 64 else 8),
        num_stages=blocks.num_stages,
        precise=q_BxSxHxE.dtype == jnp.float32,
        f32_out=f32_out,
    )
    # Pad sequences to whole blocks (padded keys are masked by index, padded queries are
    # dropped) and the head dim to a power of two (zero columns change no dot product).
    sp, tp = _round_up(s, max(bq, bqb)), _round_up(t, max(bk, bkb))
    q_seg = k_seg = None
    if plan.segmented:
        q_seg = jnp.pad(q_seg_BxS.astype(jnp.int32), ((0, 0), (0, sp - s)))
        k_seg = jnp.pad(kv_seg_BxT.astype(jnp.int32), ((0, 0), (0, tp - t)))
    q, k, v = _head_major(q_BxSxHxE, sp), _head_major(k_BxTxKxE, tp), _head_major(v_BxTxKxE, tp)
    return plan, (q, k, v, q_seg, k_seg)


def _head_major(x_BxSxHxE: jax.Array, length: int) -> jax.Array:
    """BxSxHxE -> BxHxSxE padded to `length` rows and a power-of-two head dim (>= 16)."""
    x = jnp.swapaxes(x_BxSxHxE, 1, 2)
    e = x.shape[3]
    pad = ((0, 0), (0, 0), (0, length - x.shape[2]), (0, _pow2_at_least(max(e, 16)) - e))
    return jnp.pad(x, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, k_seg, plan: Plan):
    """Padded head-major attention; gradients come from the backward kernels."""
    return flash_kernels.forward(q, k, v, q_seg, k_seg, plan)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, plan: Plan):
    out, lse = flash_kernels.forward(q, k, v, q_seg, k_seg, plan)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _flash_bwd(plan: Plan, residuals, d_out):
    q, k, v, q_seg, k_seg, out, lse = residuals
    dq, dk, dv = flash_kernels.backward(q, k, v, out, lse, d_out, q_seg, k_seg, plan)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_lse(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    *,
    q_segment_ids_BxS: jax.Array | None = None,
    kv_segment_ids_BxT: jax.Array | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Forward only: float32 (out_BxSxHxE, lse_BxSxH), lse -inf where a query sees no key.

    For callers that merge partial attentions over key blocks by their log-sum-exp (ring
    attention) and differentiate through `flash_attention_backward`.
    """
    plan, args = _prepare(
        q_BxSxHxE,
        k_BxTxKxE,
        v_BxTxKxE,
        q_segment_ids_BxS,
        kv_segment_ids_BxT,
        causal,
        q_offset,
        scale,
        block_sizes,
        backend,
        f32_out=True,
    )
    out, lse_BxHxSx1 = flash_kernels.forward(*args, plan)
    s, e = q_BxSxHxE.shape[1], q_BxSxHxE.shape[3]
    lse_BxSxH = jnp.swapaxes(lse_BxHxSx1[:, :, :s, 0], 1, 2)
    lse_BxSxH = jnp.where(lse_BxSxH >= EMPTY, -jnp.inf, lse_BxSxH)
    return jnp.swapaxes(out[:, :, :s, :e], 1, 2), lse_BxSxH


def flash_attention_backward(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    out_BxSxHxE: jax.Array,
    lse_BxSxH: jax.Array,
    d_out_BxSxHxE: jax.Array,
    *,
    q_segment_ids_BxS: jax.Array | None = None,
    kv_segment_ids_BxT: jax.Array | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Float32 (dq, dk, dv) of one query block against one key block.

    `out`, `lse` and `d_out` are those of the query rows' whole attention, over every key
    block: then the probabilities recomputed here are the true ones, and the gradients of
    all key blocks sum to the full dq (and each block's dk, dv are complete for its rows).
    """
    plan, (q, k, v, q_seg, k_seg) = _prepare(
        q_BxSxHxE,
        k_BxTxKxE,
        v_BxTxKxE,
        q_segment_ids_BxS,
        kv_segment_ids_BxT,
        causal,
        q_offset,
        scale,
        block_sizes,
        backend,
        f32_out=True,
    )
    s, e = q_BxSxHxE.shape[1], q_BxSxHxE.shape[3]
    sp, t = q.shape[2], k_BxTxKxE.shape[1]
    # The kernels mark a row that sees no key with a huge positive lse (exp(s - lse) = 0).
    lse_BxHxS = jnp.swapaxes(jnp.where(jnp.isfinite(lse_BxSxH), lse_BxSxH, EMPTY), 1, 2)
    lse_BxHxS = jnp.pad(lse_BxHxS, ((0, 0), (0, 0), (0, sp - s)), constant_values=EMPTY)
    dq, dk, dv = flash_kernels.backward(
        q,
        k,
        v,
        _head_major(out_BxSxHxE, sp),
        lse_BxHxS[..., None].astype(jnp.float32),
        _head_major(d_out_BxSxHxE.astype(q_BxSxHxE.dtype), sp),
        q_seg,
        k_seg,
        plan,
    )
    back = lambda x, n: jnp.swapaxes(x[:, :, :n, :e], 1, 2)  # noqa: E731
    return back(dq, s), back(dk, t), back(dv, t)


def reference_attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    *,
    q_segment_ids_BxS: jax.Array | None = None,
    kv_segment_ids_BxT: jax.Array | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    mask_BxSxT: jax.Array | None = None,
) -> jax.Array:
    """Plain-jnp attention with the kernel's exact semantics; materialises B x H x S x T.

    The float32 ground truth of every attention implementation. `mask_BxSxT`, if given,
    further limits which keys a query sees (True: visible), for callers whose mask is built.
    """
    b, s, h, e = q_BxSxHxE.shape
    t, kh = k_BxTxKxE.shape[1:3]
    scale = e**-0.5 if scale is None else scale
    q_BxSxKxGxE = q_BxSxHxE.reshape(b, s, kh, h // kh, e)
    logits_BxKxGxSxT = scale * jnp.einsum(
        "bskge,btke->bkgst",
        q_BxSxKxGxE,
        k_BxTxKxE,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    ok_BxSxT = jnp.ones((b, s, t), bool) if mask_BxSxT is None else mask_BxSxT
    if q_segment_ids_BxS is not None:
        ok_BxSxT = ok_BxSxT & (q_segment_ids_BxS[:, :, None] == kv_segment_ids_BxT[:, None, :])
    if causal:
        ok_BxSxT = ok_BxSxT & (jnp.arange(t)[None, :] <= jnp.arange(s)[:, None] + q_offset)
    ok = ok_BxSxT[:, None, None]
    logits_BxKxGxSxT = jnp.where(ok, logits_BxKxGxSxT, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits_BxKxGxSxT, axis=-1, keepdims=True))
    p = jnp.where(ok, jnp.exp(logits_BxKxGxSxT - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    probs = (p / jnp.where(denom == 0.0, 1.0, denom)).astype(v_BxTxKxE.dtype)
    out = jnp.einsum(
        "bkgst,btke->bskge",
        probs,
        v_BxTxKxE,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.reshape(b, s, h, e).astype(q_BxSxHxE.dtype)
