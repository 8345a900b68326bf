"""Context parallelism: attention over a sequence split across the devices of one mesh axis.

Both strategies run inside `jax.shard_map`, where each device holds a slice of the
sequence, and are built on the flash kernels (`flash_attention_lse` for the forward,
`flash_attention_backward` for one query-block/key-block pair):

- `ring_attention`: each device keeps its queries; the keys, values and their segment ids
  travel around the ring with `ppermute`, one hop per step. Partial outputs are merged by
  their log-sum-exp. A custom_vjp wraps the whole ring: the backward pass sends dk, dv
  around the ring with the keys they belong to, so no device ever holds the whole K/V.
- `gathered_attention`: K/V (and segment ids) are all-gathered once; the same block loop
  then runs locally (its transpose reduce-scatters dk, dv).

Layout (zig-zag). With n devices the sequence is cut into 2n chunks of c = S / 2n tokens;
device i holds chunks i and 2n-1-i, in that order (`zigzag`). Under a causal mask the
pair (my queries, the keys of device j) is then always one of three shapes, each half of
a 2c x 2c block, so every device does the same work at every step:
  j == i: causal over the local 2c tokens (local order is global order);
  j <  i: all my queries see j's first chunk whole and its second chunk not at all;
  j >  i: my second chunk sees both of j's chunks whole, my first chunk sees neither.
Without a causal mask the layout is irrelevant (attention is permutation equivariant).
Where one kernel call can't hold a device's tokens (TPU VMEM, `tiled_attention.tile_cap`),
each pair is computed tile pair by tile pair (`attend_tiled`, `grad_tiled`).
Callers lay their data out with `zigzag` once, so that no gather along the sequence is
ever needed (positions travel with the tokens; see jaxlm.train.step).

Names: B batch, C = 2c tokens per device, H query heads, K kv heads, E head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.kernels.flash_attention import BlockSizes
from jaxlm.kernels.tiled_attention import (
    attend_tiled,
    empty,
    grad_tiled,
    merge,
    pick_tile,
    tile_cap,
)


@dataclasses.dataclass(frozen=True)
class _Opts:
    """Static settings of one context-parallel attention (hashable: a custom_vjp argument)."""

    axis: str
    causal: bool
    scale: float | None
    block_sizes: BlockSizes | None
    backend: str | None
    tile: int | None  # tokens per kernel call (None: a whole pair in one call)


# ------------------------------------------------------------------------------- layout


def zigzag(x: jax.Array, shards: int, axis: int = 1) -> jax.Array:
    """Reorder `axis` (length S) so that its i-th of `shards` slices holds chunks i, 2n-1-i.

    A reshape, a reverse and a transpose (no gather): the second half's chunks, reversed,
    interleave with the first half's.
    """
    x = jnp.moveaxis(x, axis, 0)
    s = x.shape[0]
    if s % (2 * shards):
        raise ValueError(f"sequence length {s} is not a multiple of 2 * {shards} shards")
    halves = x.reshape(2, shards, s // (2 * shards), *x.shape[1:])
    pairs = jnp.stack([halves[0], halves[1][::-1]], axis=1)  # shards x 2 x c x ...
    return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def zigzag_order(seq_len: int, shards: int) -> np.ndarray:
    """Original index of every position of the zig-zag layout (`zigzag` of arange)."""
    return np.asarray(zigzag(jnp.arange(seq_len), shards, axis=0))


# ------------------------------------------------------------------ one pair of blocks


def _kw(opts: _Opts) -> dict:
    return {"scale": opts.scale, "block_sizes": opts.block_sizes, "backend": opts.backend}


def _seg(ids, part: slice):
    return None if ids is None else ids[:, part]


def _branch(src, me, opts: _Opts):
    """Which pair shape the keys of device `src` make with my queries: 0 diagonal,
    1 earlier (src < me), 2 later (src > me); always 1 (all visible) without causality."""
    if not opts.causal:
        return jnp.int32(1)
    return jnp.where(src == me, 0, jnp.where(src < me, 1, 2)).astype(jnp.int32)


def _cases(q, opts: _Opts):
    """(query rows, key rows, causal) of each pair shape, in `_branch`'s order."""
    c, every = q.shape[1] // 2, slice(None)
    if not opts.causal:
        return [(every, every, False)]
    # diagonal; earlier: all queries, the first key chunk; later: the second query chunk,
    # all keys (the first query chunk sees none of them).
    return [(every, every, True), (every, slice(0, c), False), (slice(c, None), every, False)]


def _attend_block(acc, q, qs, k, v, ks, branch, opts: _Opts):
    """acc = (out_BxCxHxE, lse_BxCxH), float32, merged with my queries' attention to the
    keys of one device; only the rows that see those keys are touched."""
    o, lse = acc

    def case(rows, kv, causal):
        o_p, lse_p = attend_tiled(
            q[:, rows],
            k[:, kv],
            v[:, kv],
            _seg(qs, rows),
            _seg(ks, kv),
            causal=causal,
            tile=opts.tile,
            **_kw(opts),
        )
        o_m, lse_m = merge(o[:, rows], lse[:, rows], o_p, lse_p)
        return o.at[:, rows].set(o_m), lse.at[:, rows].set(lse_m)

    cases = [functools.partial(case, *c) for c in _cases(q, opts)]
    return cases[0]() if len(cases) == 1 else jax.lax.switch(branch, cases)


def _grad_block(acc, q, qs, k, v, ks, o, lse, do, branch, opts: _Opts):
    """acc = (dq, dk, dv), float32, plus the gradients of my queries' attention to the keys
    of one device (k, v, dk, dv are that device's)."""
    dq, dk, dv = acc

    def case(rows, kv, causal):
        dq_p, dk_p, dv_p = grad_tiled(
            q[:, rows],
            k[:, kv],
            v[:, kv],
            o[:, rows],
            lse[:, rows],
            do[:, rows],
            _seg(qs, rows),
            _seg(ks, kv),
            causal=causal,
            tile=opts.tile,
            **_kw(opts),
        )
        return dq.at[:, rows].add(dq_p), dk.at[:, kv].add(dk_p), dv.at[:, kv].add(dv_p)

    cases = [functools.partial(case, *c) for c in _cases(q, opts)]
    return cases[0]() if len(cases) == 1 else jax.lax.switch(branch, cases)


# ----------------------------------------------------------------------------- the ring


def _shift(tree, axis: str):
    """Send every array to the next device of the ring (device i -> i + 1)."""
    n = jax.lax.axis_size(axis)
    perm = [(j, (j + 1) % n) for j in range(n)]
    return jax.tree.map(lambda x: None if x is None else jax.lax.ppermute(x, axis, perm), tree)


def _ring_forward(q, k, v, qs, ks, opts: _Opts):
    """(out, lse) float32: n steps, each the keys of device me - r, then one hop."""
    n, me = jax.lax.axis_size(opts.axis), jax.lax.axis_index(opts.axis)

    def step(r, carry):
        acc, kv = carry
        # The next hop does not depend on this step's attention: XLA may overlap them.
        nxt = _shift(kv, opts.axis)
        return _attend_block(acc, q, qs, *kv, _branch((me - r) % n, me, opts), opts), nxt

    acc, kv = jax.lax.fori_loop(0, n - 1, step, (empty(q), (k, v, ks)))
    return _attend_block(acc, q, qs, *kv, _branch((me + 1) % n, me, opts), opts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, qs, ks, opts: _Opts):
    o, _ = _ring_forward(q, k, v, qs, ks, opts)
    return o.astype(q.dtype)


def _ring_fwd(q, k, v, qs, ks, opts: _Opts):
    o, lse = _ring_forward(q, k, v, qs, ks, opts)
    o = o.astype(q.dtype)
    return o, (q, k, v, qs, ks, o, lse)


def _ring_bwd(opts: _Opts, residuals, do):
    """dq stays; dk, dv travel with the keys they belong to and arrive home after n hops."""
    q, k, v, qs, ks, o, lse = residuals
    n, me = jax.lax.axis_size(opts.axis), jax.lax.axis_index(opts.axis)

    def grads(r, dq, kv, dkv):
        branch = _branch((me - r) % n, me, opts)
        dq, dk, dv = _grad_block((dq, *dkv), q, qs, *kv, o, lse, do, branch, opts)
        return dq, (dk, dv)

    def step(r, carry):
        dq, kv, dkv = carry
        nxt = _shift(kv, opts.axis)
        dq, dkv = grads(r, dq, kv, dkv)
        return dq, nxt, _shift(dkv, opts.axis)

    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    init = (f32(q), (k, v, ks), (f32(k), f32(v)))
    dq, kv, dkv = jax.lax.fori_loop(0, n - 1, step, init)
    dq, dkv = grads(n - 1, dq, kv, dkv)
    dk, dv = _shift(dkv, opts.axis)  # the last hop brings them home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q_BxCxHxE: jax.Array,
    k_BxCxKxE: jax.Array,
    v_BxCxKxE: jax.Array,
    q_segment_ids_BxC: jax.Array | None = None,
    kv_segment_ids_BxC: jax.Array | None = None,
    *,
    axis_name: str,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    tile_len: int | None = None,
) -> jax.Array:
    """This device's attention output_BxCxHxE; call inside shard_map over `axis_name`,
    with each device's zig-zag slice (chunks i and 2n-1-i) of q, k, v and segment ids.
    `tile_len` (None: what one kernel call holds on the backend, `tile_cap`) bounds the
    tokens of one kernel call; longer pairs are cut into tiles."""
    opts = _options(q_BxCxHxE, k_BxCxKxE, axis_name, causal, scale, block_sizes, backend, tile_len)
    return _ring(q_BxCxHxE, k_BxCxKxE, v_BxCxKxE, q_segment_ids_BxC, kv_segment_ids_BxC, opts)


# --------------------------------------------------------------------- all-gather K/V


def _blocks_forward(q, k_all, v_all, qs, ks_all, me, opts: _Opts):
    """(out, lse) float32 of my queries against every device's keys, gathered: NxBxCxKxE."""

    def step(j, acc):
        kv = (k_all[j], v_all[j], None if ks_all is None else ks_all[j])
        return _attend_block(acc, q, qs, *kv, _branch(j, me, opts), opts)

    return jax.lax.fori_loop(0, k_all.shape[0], step, empty(q))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocks(q, k_all, v_all, qs, ks_all, me, opts: _Opts):
    return _blocks_forward(q, k_all, v_all, qs, ks_all, me, opts)[0].astype(q.dtype)


def _blocks_fwd(q, k_all, v_all, qs, ks_all, me, opts: _Opts):
    o, lse = _blocks_forward(q, k_all, v_all, qs, ks_all, me, opts)
    o = o.astype(q.dtype)
    return o, (q, k_all, v_all, qs, ks_all, me, o, lse)


def _blocks_bwd(opts: _Opts, residuals, do):
    q, k_all, v_all, qs, ks_all, me, o, lse = residuals

    def step(j, carry):
        dq, dk_all, dv_all = carry
        kv = (k_all[j], v_all[j], None if ks_all is None else ks_all[j])
        acc = (dq, dk_all[j], dv_all[j])
        dq, dk_j, dv_j = _grad_block(acc, q, qs, *kv, o, lse, do, _branch(j, me, opts), opts)
        return dq, dk_all.at[j].set(dk_j), dv_all.at[j].set(dv_j)

    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    dq, dk, dv = jax.lax.fori_loop(0, k_all.shape[0], step, (f32(q), f32(k_all), f32(v_all)))
    return dq.astype(q.dtype), dk.astype(k_all.dtype), dv.astype(v_all.dtype), None, None, None


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def gathered_attention(
    q_BxCxHxE: jax.Array,
    k_BxCxKxE: jax.Array,
    v_BxCxKxE: jax.Array,
    q_segment_ids_BxC: jax.Array | None = None,
    kv_segment_ids_BxC: jax.Array | None = None,
    *,
    axis_name: str,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    tile_len: int | None = None,
) -> jax.Array:
    """Like `ring_attention` (same zig-zag slices, same result), but K/V and their segment
    ids are all-gathered along `axis_name` once and attended to locally."""
    opts = _options(q_BxCxHxE, k_BxCxKxE, axis_name, causal, scale, block_sizes, backend, tile_len)
    gather = lambda x: None if x is None else jax.lax.all_gather(x, axis_name)  # noqa: E731
    me = jax.lax.axis_index(axis_name)
    return _blocks(
        q_BxCxHxE,
        gather(k_BxCxKxE),
        gather(v_BxCxKxE),
        q_segment_ids_BxC,
        gather(kv_segment_ids_BxC),
        me,
        opts,
    )


def _options(q, k, axis, causal, scale, block_sizes, backend, tile_len) -> _Opts:
    """The static settings of one call. When one kernel call can't hold a device's C tokens,
    pairs are cut into tiles of a chunk (C / 2): where the tile divides it, every pair
    shape is whole tiles and the causal diagonal falls on tile boundaries; else the pairs
    are padded to whole tiles (`attend_tiled`)."""
    if q.shape[1] != k.shape[1] or q.shape[1] % 2:
        raise ValueError(
            f"context-parallel attention wants the same even number of local queries and "
            f"keys (two zig-zag chunks), got {q.shape[1]} and {k.shape[1]}"
        )
    c = q.shape[1] // 2
    cap = tile_len or tile_cap(q.shape[3], q.dtype, q.shape[2] // k.shape[2], backend)
    tile = None if cap is None or 2 * c <= cap else (pick_tile(c, cap) or c)
    return _Opts(axis, bool(causal), scale, block_sizes, backend, tile)
