"""Decoder-only Transformer LM: GPT-2 and Llama styles behind one module.

The family only picks defaults (see `jaxlm.config.FAMILY_DEFAULTS`); the module reads the
resolved options (norm, position, mlp, tie_embeddings, bias), so mixed variants work too.
Pre-norm residual blocks; logits come back in the compute dtype and the loss upcasts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.attention import Attention
from jaxlm.models.layers import Mlp, Norm, default_segments, dtype_of, lm_head, normal_init
from jaxlm.models.scan import SCANNED, remat_block, scan_blocks


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig
    decode: bool = False
    scanned: bool = False  # under nn.scan: return (carry, None)

    @nn.compact
    def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS, deterministic: bool = True):
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.bias, dtype, name=name)  # noqa: E731
        h_BxSxD = norm("attn_norm")(x_BxSxD)
        x_BxSxD = x_BxSxD + Attention(cfg, self.decode, name="attn")(
            h_BxSxD, positions_BxS, segment_ids_BxS, deterministic
        )
        h_BxSxD = norm("mlp_norm")(x_BxSxD)
        x_BxSxD = x_BxSxD + Mlp(
            cfg.d_model,
            cfg.ff_dim,
            cfg.mlp,
            cfg.bias,
            cfg.init_std,
            cfg.init_std / (2 * cfg.n_layers) ** 0.5,
            cfg.dropout,
            dtype,
            name="mlp",
        )(h_BxSxD, deterministic)
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, ("batch", "length", "act_embed"))
        return (x_BxSxD, None) if self.scanned else x_BxSxD


class TransformerLM(nn.Module):
    """tokens_BxS -> logits_BxSxV, honouring per-token positions and segment ids."""

    cfg: ModelConfig
    decode: bool = False

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
        dtype = dtype_of(cfg.dtype)
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
        segment_ids_BxS = default_segments(tokens_BxS, segment_ids_BxS)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=normal_init(cfg.init_std, ("vocab", "embed")),
            name="embed",
        )
        x_BxSxD = embed(tokens_BxS)
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
        x_BxSxD = nn.Dropout(cfg.dropout)(x_BxSxD, deterministic=deterministic)
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, ("batch", "length", "act_embed"))

        if cfg.scan_layers:
            stack = scan_blocks(remat_block(Block, cfg.remat, scanned=True), cfg.n_layers)
            x_BxSxD, _ = stack(cfg, self.decode, scanned=True, name=SCANNED)(
                x_BxSxD, positions_BxS, segment_ids_BxS, deterministic
            )
        else:
            block = remat_block(Block, cfg.remat)
            for i in range(cfg.n_layers):
                x_BxSxD = block(cfg, self.decode, name=f"block_{i}")(
                    x_BxSxD, positions_BxS, segment_ids_BxS, deterministic
                )

        if return_hidden:  # the final normed hidden state, for heads other than the LM's
            return Norm(cfg.norm, cfg.norm_eps, cfg.bias, dtype, name="final_norm")(x_BxSxD)
        return lm_head(cfg, embed, x_BxSxD)
