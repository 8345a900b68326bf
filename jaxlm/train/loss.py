"""Masked cross-entropy in float32, with the optional z-loss (PaLM, Chowdhery et al. 2022).

`cross_entropy_sums` takes the whole B x S x V logits. `chunked_cross_entropy_sums` takes the
final hidden states and the LM head instead, and computes the same sums over chunks of the
sequence inside a `lax.scan`, with a hand-written backward (`jax.custom_vjp`) that recomputes
each chunk's logits: neither the logits nor their float32 copy ever exist whole, forward or
backward, only one chunk's B x N x V at a time (and per-token log Z, B x S floats, saved for
the backward). The price is one more head matmul (the recompute). Names: B batch, S sequence,
D d_model, V vocab, C chunks, N tokens per chunk.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

HeadFn = Callable[[jax.Array, jax.Array], jax.Array]  # (head weight, x_BxNxD) -> logits_BxNxV


def cross_entropy_sums(
    logits_BxSxV: jax.Array, targets_BxS: jax.Array, weights_BxS: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted sums of token cross-entropy and of log(Z)^2, and the sum of weights.

    Sums rather than means, so microbatches and data-parallel shards add up to exactly the
    mean over the whole batch once divided by the total weight.
    """
    logits = logits_BxSxV.astype(jnp.float32)
    log_z_BxS = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxS = jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
    w = weights_BxS.astype(jnp.float32)
    ce_sum = jnp.sum((log_z_BxS - target_logit_BxS) * w)
    z_sum = jnp.sum(jnp.square(log_z_BxS) * w)
    return ce_sum, z_sum, jnp.sum(w)


def chunked_cross_entropy_sums(
    hidden_BxSxD: jax.Array,
    head_fn: HeadFn,
    head_w: jax.Array,
    targets_BxS: jax.Array,
    weights_BxS: jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cross_entropy_sums(head_fn(head_w, hidden_BxSxD), targets, weights)`, `chunk` tokens
    of each row at a time.

    Chunk c holds the tokens c, c + C, c + 2C, ... of every row (C = ceil(S / chunk)), so a
    sequence-sharded S splits every chunk evenly across its shards; the sums don't depend on
    the order. If `chunk` does not divide S, the sequence is padded with weight-0 tokens.
    """
    b, s, d = hidden_BxSxD.shape
    n = min(chunk, s)
    c = -(-s // n)
    pad = c * n - s
    if pad:
        hidden_BxSxD = jnp.pad(hidden_BxSxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxS = jnp.pad(targets_BxS, ((0, 0), (0, pad)))
        weights_BxS = jnp.pad(weights_BxS, ((0, 0), (0, pad)))
    x_CxBxNxD = jnp.moveaxis(hidden_BxSxD.reshape(b, n, c, d), 2, 0)
    t_CxBxN = jnp.moveaxis(targets_BxS.reshape(b, n, c), 2, 0)
    w = weights_BxS.astype(jnp.float32)
    w_CxBxN = jnp.moveaxis(w.reshape(b, n, c), 2, 0)
    precision = jax.config.jax_default_matmul_precision  # the bwd is traced later
    ce_sum, z_sum = _chunked_sums(head_fn, precision, head_w, x_CxBxNxD, t_CxBxN, w_CxBxN)
    return ce_sum, z_sum, jnp.sum(w)


def _precision(precision):
    """The matmul precision of the forward, for the backward (traced outside its context)."""
    return (
        contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    )


def _chunk_stats(head_fn, head_w, x_BxNxD, t_BxN):
    """A chunk's log Z and target logit, in float32."""
    logits_BxNxV = head_fn(head_w, x_BxNxD).astype(jnp.float32)
    log_z_BxN = jax.nn.logsumexp(logits_BxNxV, axis=-1)
    target_logit_BxN = jnp.take_along_axis(logits_BxNxV, t_BxN[..., None], axis=-1)[..., 0]
    return log_z_BxN, target_logit_BxN


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_sums(head_fn, precision, head_w, x_CxBxNxD, t_CxBxN, w_CxBxN):
    return _chunked_fwd(head_fn, precision, head_w, x_CxBxNxD, t_CxBxN, w_CxBxN)[0]


def _chunked_fwd(head_fn, precision, head_w, x_CxBxNxD, t_CxBxN, w_CxBxN):
    def body(sums, xs):
        x_BxNxD, t_BxN, w_BxN = xs
        log_z_BxN, target_logit_BxN = _chunk_stats(head_fn, head_w, x_BxNxD, t_BxN)
        ce = jnp.sum((log_z_BxN - target_logit_BxN) * w_BxN)
        z = jnp.sum(jnp.square(log_z_BxN) * w_BxN)
        return (sums[0] + ce, sums[1] + z), log_z_BxN

    zero = jnp.zeros((), jnp.float32)
    with _precision(precision):
        sums, log_z_CxBxN = jax.lax.scan(body, (zero, zero), (x_CxBxNxD, t_CxBxN, w_CxBxN))
    return sums, (head_w, x_CxBxNxD, t_CxBxN, w_CxBxN, log_z_CxBxN)


def _chunked_bwd(head_fn, precision, residuals, cotangents):
    """d/dlogits = w (g_ce + 2 g_z log Z) softmax - w g_ce onehot(target), chunk by chunk,
    pulled back through the head's own vjp; the head weight's gradient accumulates in f32."""
    head_w, x_CxBxNxD, t_CxBxN, w_CxBxN, log_z_CxBxN = residuals
    g_ce, g_z = cotangents

    def body(dw, xs):
        x_BxNxD, t_BxN, w_BxN, log_z_BxN = xs
        logits, head_vjp = jax.vjp(head_fn, head_w, x_BxNxD)
        p_BxNxV = jnp.exp(logits.astype(jnp.float32) - log_z_BxN[..., None])
        scale_BxN = w_BxN * (g_ce + 2.0 * g_z * log_z_BxN)
        onehot_BxNxV = jax.nn.one_hot(t_BxN, p_BxNxV.shape[-1], dtype=jnp.float32)
        dlogits = p_BxNxV * scale_BxN[..., None] - onehot_BxNxV * (w_BxN * g_ce)[..., None]
        dw_c, dx_BxNxD = head_vjp(dlogits.astype(logits.dtype))
        return dw + dw_c.astype(jnp.float32), dx_BxNxD

    with _precision(precision):
        dw0 = jnp.zeros(head_w.shape, jnp.float32)
        xs = (x_CxBxNxD, t_CxBxN, w_CxBxN, log_z_CxBxN)
        dw, dx_CxBxNxD = jax.lax.scan(body, dw0, xs)
    return dw.astype(head_w.dtype), dx_CxBxNxD, None, None


_chunked_sums.defvjp(_chunked_fwd, _chunked_bwd)
