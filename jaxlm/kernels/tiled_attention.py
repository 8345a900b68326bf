"""Flash attention over ranges longer than a kernel call can hold: a loop over tile pairs.

Each grid step of the flash kernels keeps one head's whole key/value range (forward and dq
kernels) or the whole query and output-gradient range of a head group (dk/dv kernel) in
fast memory. On a TPU that is VMEM, whose scoped default (16 MiB) the compiler enforces:
at head dim 128 in bfloat16 a kernel call stops compiling at about 16k tokens.
`tile_cap` is the longest range that stays well inside it, and the functions here cut
the queries and keys into tiles of at most that length and call the kernels once per
pair of tiles, in a `fori_loop` (one kernel call of each kind in the program):

- without a causal mask every (query tile, key tile) pair is visited;
- with one (queries and keys the same range), pairs below the diagonal are attended
  whole, pairs on it with the kernel's own causal mask (tile i's queries and keys start
  at the same position), and pairs above it, which the mask hides, are skipped.

A range the tile does not cut evenly is padded to whole tiles; the padded keys are hidden
from the real queries (by the causal mask, else by a segment id of -1) and the padded
query rows are dropped. The forward merges each pair's partial output into its query tile
by log-sum-exp. The backward gives each pair the whole rows' output and log-sum-exp, so
its recomputed probabilities are the true ones: dq sums over key tiles, dk and dv over
query tiles.
Other backends (GPU shared memory is not held per range; CPU has no limit) get no cap.
Names: B batch, S queries, T keys, H query heads, K kv heads, E head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_backward,
    flash_attention_lse,
    resolve_backend,
)

# The TPU compiler's default scoped VMEM per kernel, and the share of it the whole-range
# operands may take (the rest: the blocks' scores, accumulators and outputs).
SCOPED_VMEM_BYTES = 16 * 2**20
RANGE_SHARE = 0.75
# A (1, N) row of 4-byte values (segment ids, lse, delta) occupies 8 sublanes in VMEM.
_ROW_BYTES = 8 * 4


def tile_cap(head_dim: int, dtype, groups: int, backend: str | None = None) -> int | None:
    """Most tokens one kernel call may span on `backend`; None where there is no limit.

    Per token the forward and dq kernels hold a key and a value row plus a segment id, the
    dk/dv kernel a query and an output-gradient row, lse and delta for each of the
    `groups` query heads of a kv head plus a segment id; all double-buffered.
    """
    if resolve_backend(backend) not in ("tpu", "tpu_interpret"):
        return None
    row = (1 << max(0, max(head_dim, 16) - 1).bit_length()) * jnp.dtype(dtype).itemsize
    per_token = 2 * max(2 * row + _ROW_BYTES, groups * (2 * row + 2 * _ROW_BYTES) + _ROW_BYTES)
    cap = int(SCOPED_VMEM_BYTES * RANGE_SHARE) // per_token
    return max(128, cap // 128 * 128)


def pick_tile(length: int, cap: int | None) -> int | None:
    """Tokens per tile for a range of `length` under `cap` (None: no cut needed).

    The longest tile that cuts `length` evenly into at most twice the fewest pieces; where
    none does (a prime length, say), equal tiles from the fewest pieces, rounded up to
    whole 128-token blocks, with the last one padded by the callers.
    """
    if cap is None or length <= cap:
        return None
    fewest = -(-length // cap)
    for pieces in range(fewest, 2 * fewest + 1):
        if length % pieces == 0:
            return length // pieces
    unit = 128 if cap >= 128 else 1
    per_piece = -(-length // fewest)
    return min(cap, -(-per_piece // unit) * unit)


def merge(o1, lse1, o2, lse2):
    """Combine two partial attentions over disjoint key sets by their log-sum-exp."""
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # a row that saw no key anywhere stays 0
    w1, w2 = jnp.exp(lse1 - safe)[..., None], jnp.exp(lse2 - safe)[..., None]
    return o1 * w1 + o2 * w2, lse


def empty(q):
    """float32 (out, lse) of queries that have seen no key yet."""
    b, s, h, _ = q.shape
    return jnp.zeros(q.shape, jnp.float32), jnp.full((b, s, h), -jnp.inf, jnp.float32)


def _pairs(s: int, t: int, tile: int, causal: bool):
    """(query tile, key tile) indices of the pairs to visit, as int32 arrays; `s` and `t`
    are whole tiles (padded by the callers)."""
    pairs = [(i, j) for i in range(s // tile) for j in range(t // tile) if not causal or j <= i]
    return tuple(jnp.asarray(np.array(p, np.int32)) for p in zip(*pairs, strict=True))


def _rows(x, i, tile: int):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * tile, tile, axis=1)


def _put(x, i, tile: int, part):
    return jax.lax.dynamic_update_slice_in_dim(x, part, i * tile, axis=1)


def _grow(x, length: int, value=0):
    """`x` padded along the sequence (axis 1) to `length` with `value`."""
    if x is None:
        return None
    pad = [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=value)


def _check_causal(s: int, t: int, causal: bool) -> None:
    """The tiles' causal diagonal is the whole range's only where queries and keys are one
    range (checked before padding, which could make unequal lengths equal)."""
    if causal and s != t:
        raise ValueError(f"tiled causal attention wants equal query and key lengths, got {s}, {t}")


def _pad_to_tiles(q, k, v, qs, ks, tile: int, causal: bool):
    """q, k, v and segment ids padded to whole tiles, the padded keys hidden from every
    real query: by the causal mask (they come after all of them), else by segment id -1."""
    sp, tp = (-(-n // tile) * tile for n in (q.shape[1], k.shape[1]))
    if qs is None and not causal and tp != k.shape[1]:
        qs, ks = jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.int32)
    return (
        _grow(q, sp),
        _grow(k, tp),
        _grow(v, tp),
        _grow(qs, sp, -1),
        _grow(ks, tp, -1),
    )


def _per_pair(call, causal: bool, i, j, args):
    """`call(causal)(args)` for pair (i, j): causal on the diagonal, whole below it."""
    if not causal:
        return call(False)(args)
    return jax.lax.cond(i == j, call(True), call(False), args)


def attend_tiled(q, k, v, qs, ks, *, causal: bool, tile: int | None, **kw):
    """float32 (out_BxSxHxE, lse_BxSxH) of `flash_attention_lse`, tile pairs at a time."""
    if tile is None or (q.shape[1] <= tile and k.shape[1] <= tile):
        return flash_attention_lse(
            q, k, v, q_segment_ids_BxS=qs, kv_segment_ids_BxT=ks, causal=causal, **kw
        )
    s = q.shape[1]
    _check_causal(s, k.shape[1], causal)
    if s % tile or k.shape[1] % tile:
        padded = _pad_to_tiles(q, k, v, qs, ks, tile, causal)
        o, lse = attend_tiled(*padded, causal=causal, tile=tile, **kw)
        return o[:, :s], lse[:, :s]
    pi, pj = _pairs(s, k.shape[1], tile, causal)

    def call(c):
        return lambda a: flash_attention_lse(
            a[0], a[1], a[2], q_segment_ids_BxS=a[3], kv_segment_ids_BxT=a[4], causal=c, **kw
        )

    def pair(p, acc):
        i, j = pi[p], pj[p]
        args = (_rows(q, i, tile), _rows(k, j, tile), _rows(v, j, tile), _rows(qs, i, tile))
        o_p, lse_p = _per_pair(call, causal, i, j, (*args, _rows(ks, j, tile)))
        o, lse = acc
        o_i, lse_i = merge(_rows(o, i, tile), _rows(lse, i, tile), o_p, lse_p)
        return _put(o, i, tile, o_i), _put(lse, i, tile, lse_i)

    return jax.lax.fori_loop(0, pi.shape[0], pair, empty(q))


def grad_tiled(q, k, v, o, lse, do, qs, ks, *, causal: bool, tile: int | None, **kw):
    """float32 (dq, dk, dv) of `flash_attention_backward`, tile pairs at a time; `o`,
    `lse`, `do` are the query rows' whole attention's."""
    if tile is None or (q.shape[1] <= tile and k.shape[1] <= tile):
        return flash_attention_backward(
            q, k, v, o, lse, do, q_segment_ids_BxS=qs, kv_segment_ids_BxT=ks, causal=causal, **kw
        )
    s, t = q.shape[1], k.shape[1]
    _check_causal(s, t, causal)
    if s % tile or t % tile:
        # Padded query rows get lse +inf: their probabilities are 0, so they add nothing.
        sp = -(-s // tile) * tile
        padded = _pad_to_tiles(q, k, v, qs, ks, tile, causal)
        rows = (_grow(o, sp), _grow(lse, sp, jnp.inf), _grow(do, sp))
        q2, k2, v2, qs2, ks2 = padded
        dq, dk, dv = grad_tiled(q2, k2, v2, *rows, qs2, ks2, causal=causal, tile=tile, **kw)
        return dq[:, :s], dk[:, :t], dv[:, :t]
    pi, pj = _pairs(s, t, tile, causal)

    def call(c):
        return lambda a: flash_attention_backward(
            *a[:6], q_segment_ids_BxS=a[6], kv_segment_ids_BxT=a[7], causal=c, **kw
        )

    def pair(p, acc):
        i, j = pi[p], pj[p]
        row, key = (
            functools.partial(_rows, i=i, tile=tile),
            functools.partial(_rows, i=j, tile=tile),
        )
        args = (row(q), key(k), key(v), row(o), row(lse), row(do), row(qs), key(ks))
        dq_p, dk_p, dv_p = _per_pair(call, causal, i, j, args)
        dq, dk, dv = acc
        return (
            _put(dq, i, tile, row(dq) + dq_p),
            _put(dk, j, tile, key(dk) + dk_p),
            _put(dv, j, tile, key(dv) + dv_p),
        )

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    return jax.lax.fori_loop(0, pi.shape[0], pair, (zeros(q), zeros(k), zeros(v)))


# ----------------------------------------- whole attention, tiled where the backend needs


@dataclasses.dataclass(frozen=True)
class _Opts:
    causal: bool
    tile: int
    scale: float | None
    block_sizes: BlockSizes | None
    backend: str | None

    def kw(self) -> dict:
        return {"scale": self.scale, "block_sizes": self.block_sizes, "backend": self.backend}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tiled(q, k, v, qs, ks, opts: _Opts):
    return _tiled_fwd(q, k, v, qs, ks, opts)[0]


def _tiled_fwd(q, k, v, qs, ks, opts: _Opts):
    o, lse = attend_tiled(q, k, v, qs, ks, causal=opts.causal, tile=opts.tile, **opts.kw())
    o = o.astype(q.dtype)
    return o, (q, k, v, qs, ks, o, lse)


def _tiled_bwd(opts: _Opts, residuals, do):
    q, k, v, qs, ks, o, lse = residuals
    dq, dk, dv = grad_tiled(
        q, k, v, o, lse, do, qs, ks, causal=opts.causal, tile=opts.tile, **opts.kw()
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def long_flash_attention(
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
    tile_len: int | None = None,
) -> jax.Array:
    """`flash_attention`, cut into tiles where one kernel call could not hold the range.

    `tile_len` (None: `tile_cap` of the backend) forces a tile, for tests. Self-attention
    without an offset is tiled; a query block placed at an offset (decoding) is not.
    """
    s, t = q_BxSxHxE.shape[1], k_BxTxKxE.shape[1]
    groups = q_BxSxHxE.shape[2] // max(1, k_BxTxKxE.shape[2])
    cap = tile_len or tile_cap(q_BxSxHxE.shape[3], q_BxSxHxE.dtype, groups, backend)
    tile = pick_tile(max(s, t), cap) if s == t else None
    kw = {"scale": scale, "block_sizes": block_sizes, "backend": backend}
    if tile is None or q_offset:
        return flash_attention(
            q_BxSxHxE,
            k_BxTxKxE,
            v_BxTxKxE,
            q_segment_ids_BxS=q_segment_ids_BxS,
            kv_segment_ids_BxT=kv_segment_ids_BxT,
            causal=causal,
            q_offset=q_offset,
            **kw,
        )
    opts = _Opts(bool(causal), tile, **kw)
    return _tiled(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_segment_ids_BxS, kv_segment_ids_BxT, opts)
