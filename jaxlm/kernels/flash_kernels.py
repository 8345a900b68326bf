"""The three Pallas kernels of flash attention: forward, dq, and dk/dv.

Arrays arrive already laid out and padded by `jaxlm.kernels.flash_attention`:
q_BxHxSxE, k/v_BxKxTxE (S, T multiples of every block size, E a power of two), and
per-row vectors as columns (`_Bx..xSx1`) or rows (`_Bx..x1xS`); a reshape between the
two is free because the unit axis carries no data. Names: B batch, H query heads,
K kv heads, G = H / K query heads per kv head, S queries, T keys, E head dim,
Q/C rows of a query/key block.

Each kernel instance owns one output block and loops over the blocks it reads with
`fori_loop`, so no state crosses grid steps: that is what lets one kernel body run
under the Triton backend (independent programs), Mosaic (TPU) and the CPU interpreter.
Blocks that the causal mask hides entirely are never visited; blocks that it shows
entirely skip the mask arithmetic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# A running maximum starts here rather than at -inf: masked scores are -inf, and
# exp(-inf - floor) = 0 where exp(-inf - (-inf)) would be NaN.
M_FLOOR = -1e30
# Log-sum-exp stored for queries that see no key: exp(score - EMPTY_LSE) = 0 in backward.
EMPTY_LSE = 1e30


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static facts one set of kernels is compiled for (hashable: a custom_vjp argument)."""

    scale: float
    causal: bool
    q_offset: int
    q_len: int  # real (unpadded) query count
    kv_len: int  # real (unpadded) key count
    groups: int  # G: query heads per kv head
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    segmented: bool
    backend: str  # "cpu" (interpret), "gpu" (Triton), "tpu" (Mosaic), "tpu_interpret" (tests)
    num_warps: int | None = None
    num_stages: int | None = None
    precise: bool = False  # float32 inputs: ask for full-precision matmuls (no TF32)
    f32_out: bool = False  # out, dq, dk, dv in float32: partials a caller merges (ring)


def _call_options(plan: Plan, grid_rank: int) -> dict:
    """`pallas_call` keyword arguments that pick the backend."""
    if plan.backend == "cpu":
        return {"interpret": True}
    if plan.backend == "gpu":
        params = plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)
        return {"compiler_params": params}
    if plan.backend in ("tpu", "tpu_interpret"):
        params = pltpu.CompilerParams(("parallel",) * grid_rank)
        if plan.backend == "tpu_interpret":  # TPU memory spaces and DMAs, simulated on CPU
            return {"compiler_params": params, "interpret": pltpu.InterpretParams()}
        return {"compiler_params": params}
    raise ValueError(f"flash attention has no lowering for backend {plan.backend!r}")


def _dot(a: jax.Array, b: jax.Array, plan: Plan, transpose_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) with float32 accumulation."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if plan.precise else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _visible(q_idx, k_idx, q_seg, k_seg, plan: Plan, index_mask: bool):
    """Boolean: may the query at q_idx see the key at k_idx? (None: always.)"""
    ok = None
    if index_mask:
        if plan.causal:
            ok = k_idx <= q_idx + plan.q_offset
        if plan.kv_len % plan.block_k or plan.kv_len % plan.block_k_bwd:
            in_range = k_idx < plan.kv_len
            ok = in_range if ok is None else ok & in_range
    if q_seg is not None:
        same = q_seg == k_seg
        ok = same if ok is None else ok & same
    return ok


def _div(a, b: int):
    """Floor division of a non-negative traced int (truncation: no sign op, which Mosaic
    lowers only on a real TPU)."""
    return jax.lax.div(a, jnp.int32(b))


def _kv_blocks(i, block_q: int, block_k: int, plan: Plan):
    """For query block i: (kv blocks needing no index mask, kv blocks to visit at all)."""
    n_kv = pl.cdiv(plan.kv_len, block_k)
    n_whole = plan.kv_len // block_k  # blocks without padded keys
    if not plan.causal:
        return n_whole, n_kv
    first_q = i * block_q + plan.q_offset
    hi = jnp.minimum(_div(first_q + block_q + block_k - 1, block_k), n_kv)
    n_full = jnp.minimum(_div(first_q + 1, block_k), jnp.minimum(hi, n_whole))
    return n_full, hi


def _q_blocks(j, block_q: int, block_k: int, plan: Plan):
    """For kv block j: (first query block that sees it, first that sees it unmasked)."""
    n_q = pl.cdiv(plan.q_len, block_q)
    ragged = (j + 1) * block_k > plan.kv_len
    if not plan.causal:
        return 0, jnp.where(ragged, n_q, 0)
    lo = jnp.minimum(_div(jnp.maximum(j * block_k - plan.q_offset, 0), block_q), n_q)
    last_k = (j + 1) * block_k - 1
    lo_full = _div(jnp.maximum(last_k - plan.q_offset, 0) + block_q - 1, block_q)
    lo_full = jnp.clip(lo_full, lo, n_q)
    return lo, jnp.where(ragged, n_q, lo_full)


def _key_block_scores(
    q_QxE, q_idx, q_seg_Qx1, k_ref, v_ref, kseg_ref, start, bk: int, plan: Plan, index_mask: bool
):
    """Scaled scores of a query block against the key block at `start`, hidden keys at -inf.

    Shared by the forward and dq kernels, which walk the same key blocks; returns the block's
    k and v too, since both kernels go on to use them.
    """
    k_CxE = k_ref[pl.ds(start, bk), :]
    v_CxE = v_ref[pl.ds(start, bk), :]
    s_QxC = _dot(q_QxE, k_CxE, plan, transpose_b=True) * plan.scale
    k_seg = None if q_seg_Qx1 is None else kseg_ref[:, pl.ds(start, bk)]
    k_idx = start + jax.lax.broadcasted_iota(jnp.int32, (q_QxE.shape[0], bk), 1)
    ok = _visible(q_idx, k_idx, q_seg_Qx1, k_seg, plan, index_mask)
    if ok is not None:
        s_QxC = jnp.where(ok, s_QxC, -jnp.inf)
    return s_QxC, k_CxE, v_CxE


# ------------------------------------------------------------------------------ forward


def _fwd_kernel(*refs, plan: Plan):
    """One query block: online softmax over the visible key blocks; writes out and lse."""
    if plan.segmented:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
        q_seg_Qx1 = qseg_ref[...]
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_seg_Qx1 = kseg_ref = None
    bq, bk = plan.block_q, plan.block_k
    i = pl.program_id(2)
    q_QxE = q_ref[...]
    q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    def step(j, carry, index_mask: bool):
        acc_QxE, m_Qx1, l_Qx1 = carry
        start = pl.multiple_of(j * bk, bk)
        s_QxC, k_CxE, v_CxE = _key_block_scores(
            q_QxE, q_idx, q_seg_Qx1, k_ref, v_ref, kseg_ref, start, bk, plan, index_mask
        )
        m_new = jnp.maximum(m_Qx1, jnp.max(s_QxC, axis=1, keepdims=True))
        p_QxC = jnp.exp(s_QxC - m_new)
        alpha = jnp.exp(m_Qx1 - m_new)
        l_new = alpha * l_Qx1 + jnp.sum(p_QxC, axis=1, keepdims=True)
        acc_QxE = alpha * acc_QxE + _dot(p_QxC.astype(v_CxE.dtype), v_CxE, plan)
        return acc_QxE, m_new, l_new

    n_full, hi = _kv_blocks(i, bq, bk, plan)
    carry = (
        jnp.zeros(q_QxE.shape, jnp.float32),
        jnp.full((bq, 1), M_FLOOR, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, n_full, lambda j, c: step(j, c, False), carry)
    acc_QxE, m_Qx1, l_Qx1 = jax.lax.fori_loop(n_full, hi, lambda j, c: step(j, c, True), carry)
    empty = l_Qx1 == 0.0  # no visible key: output zeros, never 0/0
    o_ref[...] = (acc_QxE / jnp.where(empty, 1.0, l_Qx1)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, EMPTY_LSE, m_Qx1 + jnp.log(jnp.where(empty, 1.0, l_Qx1)))


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg_BxS: jax.Array | None,
    k_seg_BxT: jax.Array | None,
    plan: Plan,
) -> tuple[jax.Array, jax.Array]:
    """(out_BxHxSxE, lse_BxHxSx1) of padded, head-major inputs."""
    b, h, s, e = q.shape
    t, g = k.shape[2], plan.groups
    bq = plan.block_q
    in_specs = [
        pl.BlockSpec((None, None, bq, e), lambda b_, h_, i: (b_, h_, i, 0)),
        pl.BlockSpec((None, None, t, e), lambda b_, h_, i: (b_, _div(h_, g), 0, 0)),
        pl.BlockSpec((None, None, t, e), lambda b_, h_, i: (b_, _div(h_, g), 0, 0)),
    ]
    args = [q, k, v]
    if plan.segmented:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b_, h_, i: (b_, i, 0)),
            pl.BlockSpec((None, 1, t), lambda b_, h_, i: (b_, 0, 0)),
        ]
        args += [q_seg_BxS.reshape(b, s, 1), k_seg_BxT.reshape(b, 1, t)]
    return pl.pallas_call(
        lambda *refs: _fwd_kernel(*refs, plan=plan),
        grid=(b, h, s // bq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, e), lambda b_, h_, i: (b_, h_, i, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i: (b_, h_, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, jnp.float32 if plan.f32_out else q.dtype),
            jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32),
        ],
        name="flash_fwd",
        **_call_options(plan, 3),
    )(*args)


# ------------------------------------------------------------------------------ backward


def _dq_kernel(*refs, plan: Plan):
    """One query block: dq = scale * sum over key blocks of dS @ K."""
    if plan.segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
        q_seg_Qx1 = qseg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        q_seg_Qx1 = kseg_ref = None
    bq, bk = plan.block_q_bwd, plan.block_k_bwd
    i = pl.program_id(2)
    q_QxE, do_QxE = q_ref[...], do_ref[...]
    lse_Qx1, delta_Qx1 = lse_ref[...], delta_ref[...]
    q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    def step(j, dq_QxE, index_mask: bool):
        start = pl.multiple_of(j * bk, bk)
        s_QxC, k_CxE, v_CxE = _key_block_scores(
            q_QxE, q_idx, q_seg_Qx1, k_ref, v_ref, kseg_ref, start, bk, plan, index_mask
        )
        p_QxC = jnp.exp(s_QxC - lse_Qx1)
        dp_QxC = _dot(do_QxE, v_CxE, plan, transpose_b=True)
        ds_QxC = p_QxC * (dp_QxC - delta_Qx1)
        return dq_QxE + _dot(ds_QxC.astype(k_CxE.dtype), k_CxE, plan)

    n_full, hi = _kv_blocks(i, bq, bk, plan)
    dq_QxE = jnp.zeros(q_QxE.shape, jnp.float32)
    dq_QxE = jax.lax.fori_loop(0, n_full, lambda j, c: step(j, c, False), dq_QxE)
    dq_QxE = jax.lax.fori_loop(n_full, hi, lambda j, c: step(j, c, True), dq_QxE)
    dq_ref[...] = (dq_QxE * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, plan: Plan):
    """One key block: dk, dv summed over its G query heads and the query blocks that see it.

    Works on transposed scores (keys down, queries across) so that lse and delta are
    rows and every matmul is a plain or right-transposed product.
    """
    if plan.segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
        k_seg_Cx1 = kseg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        k_seg_Cx1 = None
    bq, bk = plan.block_q_bwd, plan.block_k_bwd
    j = pl.program_id(2)
    k_CxE, v_CxE = k_ref[...], v_ref[...]
    k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 0)

    def step(i, carry, g, index_mask: bool):
        dk_CxE, dv_CxE = carry
        start = pl.multiple_of(i * bq, bq)
        q_QxE = q_ref[g, pl.ds(start, bq), :]
        do_QxE = do_ref[g, pl.ds(start, bq), :]
        lse_1xQ = lse_ref[g, :, pl.ds(start, bq)]
        delta_1xQ = delta_ref[g, :, pl.ds(start, bq)]
        s_CxQ = _dot(k_CxE, q_QxE, plan, transpose_b=True) * plan.scale
        q_seg = None if k_seg_Cx1 is None else qseg_ref[:, pl.ds(start, bq)]
        q_idx = start + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        ok = _visible(q_idx, k_idx, q_seg, k_seg_Cx1, plan, index_mask)
        if ok is not None:
            s_CxQ = jnp.where(ok, s_CxQ, -jnp.inf)
        p_CxQ = jnp.exp(s_CxQ - lse_1xQ)
        dv_CxE = dv_CxE + _dot(p_CxQ.astype(do_QxE.dtype), do_QxE, plan)
        dp_CxQ = _dot(v_CxE, do_QxE, plan, transpose_b=True)
        ds_CxQ = p_CxQ * (dp_CxQ - delta_1xQ)
        dk_CxE = dk_CxE + _dot(ds_CxQ.astype(q_QxE.dtype), q_QxE, plan)
        return dk_CxE, dv_CxE

    lo, lo_full = _q_blocks(j, bq, bk, plan)
    n_q = pl.cdiv(plan.q_len, bq)

    def head(g, carry):
        carry = jax.lax.fori_loop(lo, lo_full, lambda i, c: step(i, c, g, True), carry)
        return jax.lax.fori_loop(lo_full, n_q, lambda i, c: step(i, c, g, False), carry)

    zeros = jnp.zeros(k_CxE.shape, jnp.float32)
    dk_CxE, dv_CxE = jax.lax.fori_loop(0, plan.groups, head, (zeros, zeros))
    dk_ref[...] = (dk_CxE * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CxE.astype(dv_ref.dtype)


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse_BxHxSx1: jax.Array,
    d_out: jax.Array,
    q_seg_BxS: jax.Array | None,
    k_seg_BxT: jax.Array | None,
    plan: Plan,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of padded, head-major inputs, from the forward's output and lse."""
    b, h, s, e = q.shape
    kh, t, g = k.shape[1], k.shape[2], plan.groups
    bq, bk = plan.block_q_bwd, plan.block_k_bwd
    # delta_i = sum_e dO_ie O_ie = sum_j P_ij dP_ij: the softmax Jacobian's diagonal term.
    delta_BxHxSx1 = jnp.sum(
        out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True
    )
    seg_args = []
    if plan.segmented:
        seg_args = [q_seg_BxS.reshape(b, s, 1), k_seg_BxT.reshape(b, 1, t)]
    row = lambda b_, h_, i: (b_, h_, i, 0)
    kv_of_head = lambda b_, h_, i: (b_, _div(h_, g), 0, 0)
    dq_specs = [
        pl.BlockSpec((None, None, bq, e), row),
        pl.BlockSpec((None, None, t, e), kv_of_head),
        pl.BlockSpec((None, None, t, e), kv_of_head),
        pl.BlockSpec((None, None, bq, e), row),
        pl.BlockSpec((None, None, bq, 1), row),
        pl.BlockSpec((None, None, bq, 1), row),
    ]
    if plan.segmented:
        dq_specs += [
            pl.BlockSpec((None, bq, 1), lambda b_, h_, i: (b_, i, 0)),
            pl.BlockSpec((None, 1, t), lambda b_, h_, i: (b_, 0, 0)),
        ]
    dq = pl.pallas_call(
        lambda *refs: _dq_kernel(*refs, plan=plan),
        grid=(b, h, s // bq),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, None, bq, e), row),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32 if plan.f32_out else q.dtype),
        name="flash_dq",
        **_call_options(plan, 3),
    )(q, k, v, d_out, lse_BxHxSx1, delta_BxHxSx1, *seg_args)

    # The dk/dv kernel reads the G query heads of its kv head as one block of the H axis.
    group_of = lambda b_, kh_, j: (b_, kh_, 0, 0)
    key_row = lambda b_, kh_, j: (b_, kh_, j, 0)
    dkv_specs = [
        pl.BlockSpec((None, g, s, e), group_of),
        pl.BlockSpec((None, None, bk, e), key_row),
        pl.BlockSpec((None, None, bk, e), key_row),
        pl.BlockSpec((None, g, s, e), group_of),
        pl.BlockSpec((None, g, 1, s), group_of),
        pl.BlockSpec((None, g, 1, s), group_of),
    ]
    if plan.segmented:
        dkv_specs += [
            pl.BlockSpec((None, 1, s), lambda b_, kh_, j: (b_, 0, 0)),
            pl.BlockSpec((None, bk, 1), lambda b_, kh_, j: (b_, j, 0)),
        ]
        seg_args = [q_seg_BxS.reshape(b, 1, s), k_seg_BxT.reshape(b, t, 1)]
    dk, dv = pl.pallas_call(
        lambda *refs: _dkv_kernel(*refs, plan=plan),
        grid=(b, kh, t // bk),
        in_specs=dkv_specs,
        out_specs=[
            pl.BlockSpec((None, None, bk, e), key_row),
            pl.BlockSpec((None, None, bk, e), key_row),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, jnp.float32 if plan.f32_out else k.dtype),
            jax.ShapeDtypeStruct(v.shape, jnp.float32 if plan.f32_out else v.dtype),
        ],
        name="flash_dkv",
        **_call_options(plan, 3),
    )(
        q,
        k,
        v,
        d_out,
        lse_BxHxSx1.reshape(b, h, 1, s),
        delta_BxHxSx1.reshape(b, h, 1, s),
        *seg_args,
    )
    return dq, dk, dv
