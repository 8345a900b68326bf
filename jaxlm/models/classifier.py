"""A sequence classifier: a pretrained LM body, pooled, then one dense layer to class logits.

Pooling takes the final normed hidden state of the last real (non-pad) token for the
decoder LMs, which is the only position that has seen the whole text. The bidirectional
recurrent encoder instead concatenates its forward state at the last real token with its
backward state at the first token: each direction's summary of the whole text. Padding sits
on the right, so it never reaches the pooled positions; in the encoder, pad tokens form their
own segment and the backward recurrence restarts where the text begins.

The LM body lives under the "backbone" key with the LM's own parameter names, so a
pretrained LM's parameters drop in (the LM's output head, unused here, is left out).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.models import lm_class
from jaxlm.models.layers import Dense
from jaxlm.models.rnn import RecurrentEncoder


class SequenceClassifier(nn.Module):
    """(tokens_BxS right-padded, lengths_B) -> logits_BxC."""

    cfg: ModelConfig
    n_classes: int
    bidirectional: bool = False

    @nn.compact
    def __call__(
        self, tokens_BxS: jax.Array, lengths_B: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        cfg = self.cfg
        s = tokens_BxS.shape[1]
        # Real tokens are segment 1 and padding segment 0, so they never mix.
        segment_ids_BxS = (jnp.arange(s)[None, :] < lengths_B[:, None]).astype(jnp.int32)
        last_B = jnp.maximum(lengths_B - 1, 0)
        if self.bidirectional:
            h_BxSx2D = RecurrentEncoder(cfg, name="backbone")(
                tokens_BxS, segment_ids_BxS, deterministic
            )
            d = cfg.d_model
            fwd_BxD = jnp.take_along_axis(h_BxSx2D[..., :d], last_B[:, None, None], axis=1)[:, 0]
            pooled_BxF = jnp.concatenate([fwd_BxD, h_BxSx2D[:, 0, d:]], axis=-1)
        else:
            h_BxSxD = lm_class(cfg)(cfg, name="backbone")(
                tokens_BxS, None, segment_ids_BxS, deterministic, return_hidden=True
            )
            pooled_BxF = jnp.take_along_axis(h_BxSxD, last_B[:, None, None], axis=1)[:, 0]
        head = Dense(self.n_classes, ("embed", None), use_bias=True, std=cfg.init_std, name="head")
        return head(pooled_BxF.astype(jnp.float32))


def init_params(model: SequenceClassifier, seq_len: int, seed: int) -> Any:
    """Freshly initialised (unboxed, float32) classifier parameters."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    lengths = jnp.ones((1,), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(seed), tokens, lengths)
    return nn.unbox(boxed)["params"]


def _encoder_source_name(name: str) -> str:
    # The encoder's forward recurrences are the LM's layers; everything else is its own.
    return "layer_" + name.removeprefix("forward_") if name.startswith("forward_") else name


def transfer_backbone(
    params: Any, pretrained: Any, bidirectional: bool, source: str
) -> tuple[Any, int, int]:
    """Copy pretrained LM parameters into `params["backbone"]`; returns (params, copied, fresh).

    For a decoder every backbone parameter must come from the checkpoint with the same
    shape. The bidirectional encoder takes what matches by name and shape (the embedding,
    the first forward recurrence) and keeps the rest freshly initialised.
    """
    flat_src = {
        tuple(getattr(k, "key", str(k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(pretrained)[0]
    }
    copied = fresh = 0

    def take(path, leaf):
        nonlocal copied, fresh
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        src_keys = (_encoder_source_name(keys[0]), *keys[1:]) if bidirectional else keys
        src = flat_src.get(src_keys)
        if src is not None and tuple(src.shape) == tuple(leaf.shape):
            copied += 1
            return jnp.asarray(src, jnp.float32)
        if not bidirectional:
            raise ConfigError(
                f"The checkpoint '{source}' lacks parameter {'/'.join(keys)} of shape "
                f"{tuple(leaf.shape)}; use a checkpoint of the same model family and size."
            )
        fresh += 1
        return leaf

    backbone = jax.tree_util.tree_map_with_path(take, params["backbone"])
    return {**params, "backbone": backbone}, copied, fresh
