"""Decoder-only Transformer LM: GPT-2 and Llama styles behind one module.

The family only picks defaults (see `jaxlm.config.FAMILY_DEFAULTS`); the module reads the
resolved options (norm, position, mlp, tie_embeddings, bias), so mixed variants work too.
Pre-norm residual blocks; logits come back in the compute dtype and the loss upcasts.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxlm.config import ModelConfig
from jaxlm.models.attention import Attention
from jaxlm.models.lm import ACT_BxSxD, LanguageModel, mlp, norm
from jaxlm.models.moe import MoeMlp
from jaxlm.models.scan import SCANNED, remat_block, scan_blocks


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)); the mlp may be a mixture of experts."""

    cfg: ModelConfig
    decode: bool = False
    scanned: bool = False  # under nn.scan: return (carry, None)
    moe: bool = False  # a MoeMlp (named "moe") in place of the dense "mlp"

    @nn.compact
    def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS, deterministic: bool = True):
        cfg = self.cfg
        h_BxSxD = norm(cfg, "attn_norm")(x_BxSxD)
        x_BxSxD = x_BxSxD + Attention(cfg, self.decode, name="attn")(
            h_BxSxD, positions_BxS, segment_ids_BxS, deterministic
        )
        h_BxSxD = norm(cfg, "mlp_norm")(x_BxSxD)
        ffn = MoeMlp(cfg, name="moe") if self.moe else mlp(cfg)
        x_BxSxD = x_BxSxD + ffn(h_BxSxD, deterministic)
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, ACT_BxSxD)
        return (x_BxSxD, None) if self.scanned else x_BxSxD


class TransformerLM(LanguageModel):
    """tokens_BxS -> logits_BxSxV, honouring per-token positions and segment ids."""

    def blocks(
        self,
        x_BxSxD: jax.Array,
        positions_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        deterministic: bool,
    ) -> jax.Array:
        """n_layers blocks, looped (block_0 ..) or as one nn.scan over stacked parameters."""
        cfg = self.cfg
        if cfg.scan_layers:
            stack = scan_blocks(remat_block(Block, cfg.remat, scanned=True), cfg.n_layers)
            moe = cfg.is_moe_layer(0)  # validation allows scan only with identical blocks
            x_BxSxD, _ = stack(cfg, self.decode, scanned=True, moe=moe, name=SCANNED)(
                x_BxSxD, positions_BxS, segment_ids_BxS, deterministic
            )
            return x_BxSxD
        block = remat_block(Block, cfg.remat)
        for i in range(cfg.n_layers):
            moe = cfg.is_moe_layer(i)
            x_BxSxD = block(cfg, self.decode, moe=moe, name=f"block_{i}")(
                x_BxSxD, positions_BxS, segment_ids_BxS, deterministic
            )
        return x_BxSxD
