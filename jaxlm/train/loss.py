"""Masked cross-entropy in float32, with the optional z-loss (PaLM, Chowdhery et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
