"""The language-model wrapper every family shares: embed -> the family's blocks -> norm -> head.

`LanguageModel` owns the call convention, `(tokens_BxS, positions_BxS, segment_ids_BxS,
deterministic, return_hidden) -> logits_BxSxV`, so training, evaluation, generation and the
classifier treat the Transformer, LSTM/GRU and Hawk models alike. A family subclasses it
and supplies only `blocks`, its residual stack. The helpers below create their modules in
the caller's scope under fixed names (embed, pos_embed, final_norm, head, mlp), so the
parameter tree does not depend on which class builds it.
Names: B batch, S sequence, D d_model, V vocab.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.layers import Kernel, Mlp, Norm, dtype_of, normal_init, stacked_dense
from jaxlm.models.lora import lora_rank, lora_scale

ACT_BxSxD = ("batch", "length", "act_embed")


def out_init_std(cfg: ModelConfig) -> float:
    """Init std of the projections that write into the residual stream."""
    # 2 * n_layers writes add up in the stream; scaling each (GPT-2) keeps its variance
    # at init independent of depth.
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5


def norm(cfg: ModelConfig, name: str) -> Norm:
    """The configured LayerNorm or RMSNorm."""
    return Norm(cfg.norm, cfg.norm_eps, cfg.bias, dtype_of(cfg.dtype), name=name)


def mlp(cfg: ModelConfig, name: str = "mlp") -> Mlp:
    """The configured MLP, its output projection scaled as a residual write."""
    return Mlp(
        cfg.d_model,
        cfg.ff_dim,
        cfg.mlp,
        cfg.bias,
        cfg.init_std,
        out_init_std(cfg),
        cfg.dropout,
        dtype_of(cfg.dtype),
        lora_rank(cfg, "mlp"),
        lora_scale(cfg),
        name=name,
    )


def default_positions(tokens_BxS: jax.Array, positions_BxS: jax.Array | None) -> jax.Array:
    """The given positions, or 0 .. S-1 in every row."""
    if positions_BxS is not None:
        return positions_BxS
    return jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)


def default_segments(tokens_BxS: jax.Array, segment_ids_BxS: jax.Array | None) -> jax.Array:
    """The given segment ids, or one segment per row."""
    return jnp.ones_like(tokens_BxS) if segment_ids_BxS is None else segment_ids_BxS


def embed(
    cfg: ModelConfig,
    tokens_BxS: jax.Array,
    positions_BxS: jax.Array | None = None,
    scale: bool = False,
) -> tuple[jax.Array, nn.Embed]:
    """(x_BxSxD, table): token embeddings (+ learned positions) and the table a tied head reads.

    `scale` multiplies by sqrt(d_model), giving unit-scale inputs from a small-std table (the
    recurrent families).
    """
    dtype = dtype_of(cfg.dtype)
    table = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=normal_init(cfg.init_std, ("vocab", "embed")),
        name="embed",
    )
    x_BxSxD = table(tokens_BxS)
    if scale:
        x_BxSxD = x_BxSxD * jnp.asarray(cfg.d_model**0.5, dtype)
    if cfg.position == "learned":
        pos_embed = nn.Embed(
            cfg.max_seq_len,
            cfg.d_model,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=normal_init(cfg.init_std / 2, (None, "embed")),
            name="pos_embed",
        )
        x_BxSxD = x_BxSxD + pos_embed(positions_BxS)
    return nn.with_logical_constraint(x_BxSxD, ACT_BxSxD), table


def head(cfg: ModelConfig, table: nn.Embed, x_BxSxD: jax.Array) -> jax.Array:
    """Logits from the final normed state: the tied embedding table or an untied projection."""
    if cfg.tie_embeddings:
        weight = table.embedding
    else:
        shape = ((cfg.d_model,), (cfg.vocab_size,))
        weight = Kernel(*shape, ("embed", "vocab"), std=cfg.init_std, name="head")()[0]
    return head_logits(cfg, weight, x_BxSxD)


def head_weight(cfg: ModelConfig, params: dict) -> jax.Array:
    """The parameter `head` reads: the embedding table [V, D] if tied, else the head's [D, V]."""
    return params["embed"]["embedding"] if cfg.tie_embeddings else params["head"]["kernel"]


def head_logits(cfg: ModelConfig, weight: jax.Array, x_BxSxD: jax.Array) -> jax.Array:
    """The LM head as a pure function of its `head_weight`: logits of any B x S' x D states
    (a whole sequence, or one chunk of it for the chunked loss), in the compute dtype."""
    dtype = dtype_of(cfg.dtype)
    if cfg.tie_embeddings:  # what nn.Embed.attend computes
        logits_BxSxV = jnp.dot(jnp.asarray(x_BxSxD, dtype), jnp.asarray(weight, dtype).T)
    else:  # what Dense computes, with its hand-written backward
        (logits_BxSxV,) = stacked_dense(x_BxSxD, [weight], [None], dtype)
    return nn.with_logical_constraint(logits_BxSxV, ("batch", "length", "act_vocab"))


class LanguageModel(nn.Module):
    """tokens_BxS -> logits_BxSxV: embed, the family's `blocks`, final norm, LM head."""

    cfg: ModelConfig
    decode: bool = False

    scale_embeddings: ClassVar[bool] = False  # see `embed`

    def blocks(
        self,
        x_BxSxD: jax.Array,
        positions_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        deterministic: bool,
    ) -> jax.Array:
        """The family's residual stack over the embedded tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not define its blocks")

    @nn.compact
    def __call__(
        self,
        tokens_BxS: jax.Array,
        positions_BxS: jax.Array | None = None,
        segment_ids_BxS: jax.Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ) -> jax.Array:
        cfg = self.cfg
        positions_BxS = default_positions(tokens_BxS, positions_BxS)
        segment_ids_BxS = default_segments(tokens_BxS, segment_ids_BxS)
        x_BxSxD, table = embed(cfg, tokens_BxS, positions_BxS, self.scale_embeddings)
        x_BxSxD = nn.Dropout(cfg.dropout)(x_BxSxD, deterministic=deterministic)
        x_BxSxD = self.blocks(x_BxSxD, positions_BxS, segment_ids_BxS, deterministic)
        x_BxSxD = norm(cfg, "final_norm")(x_BxSxD)
        if return_hidden:  # what the head reads, for heads other than the LM's
            return x_BxSxD
        return head(cfg, table, x_BxSxD)
