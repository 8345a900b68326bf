"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token a step.

Recurrent models use the same path: their `cache` holds the carried state instead of keys
and values, so each new token costs O(1) whatever the length.

The whole decode (prefill + `lax.scan` over new tokens) is one jit-compiled function, so a
sample costs one compilation and no per-token Python dispatch.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.models.transformer import build_model


def sample_logits(
    logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_k: int
) -> jax.Array:
    """Greedy when temperature == 0, else softmax(logits / T) restricted to the top k."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if top_k > 0:
        kth_BxK = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_BxK, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k"))
def _decode(
    cfg: ModelConfig,
    params: Any,
    prompt_BxP: jax.Array,
    rng: jax.Array,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
) -> jax.Array:
    model = build_model(cfg, decode=True)
    b, p = prompt_BxP.shape
    total = p + max_new_tokens
    cache_shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((b, total), jnp.int32))["cache"]
    )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

    positions_BxP = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits_BxPxV, vars_ = model.apply(
        {"params": params, "cache": cache}, prompt_BxP, positions_BxP, mutable=["cache"]
    )
    rng, first_rng = jax.random.split(rng)
    token_B = sample_logits(logits_BxPxV[:, -1], first_rng, temperature, top_k)

    def step(carry, i):
        cache, token_B, rng = carry
        rng, step_rng = jax.random.split(rng)
        pos_Bx1 = jnp.full((b, 1), p + i, jnp.int32)
        logits_Bx1xV, vars_ = model.apply(
            {"params": params, "cache": cache}, token_B[:, None], pos_Bx1, mutable=["cache"]
        )
        nxt_B = sample_logits(logits_Bx1xV[:, 0], step_rng, temperature, top_k)
        return (vars_["cache"], nxt_B, rng), token_B

    _, tokens_NxB = jax.lax.scan(step, (vars_["cache"], token_B, rng), jnp.arange(max_new_tokens))
    return tokens_NxB.T


def generate(
    cfg: ModelConfig,
    params: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | None = None,
    num_samples: int = 1,
) -> list[list[int]]:
    """Continue one prompt `num_samples` times; each continuation stops before EOS."""
    if max_new_tokens <= 0:
        return [[] for _ in range(num_samples)]
    if cfg.recurrent:  # a carried state of fixed size: no length limit
        room = max(len(prompt_ids), 1)
    else:
        room = cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt within "
            f"model.max_seq_len={cfg.max_seq_len}; ask for fewer new tokens."
        )
    prompt = list(prompt_ids)[-room:] or [0]  # keep the prompt's end if it is too long
    prompt_BxP = jnp.asarray(np.tile(np.asarray(prompt, np.int32), (num_samples, 1)))
    out = _decode(
        cfg,
        params,
        prompt_BxP,
        jax.random.PRNGKey(seed),
        max_new_tokens,
        float(temperature),
        int(top_k),
    )
    results = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results
