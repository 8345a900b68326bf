"""Hawk: a recurrent LM built on the RG-LRU, a diagonal linear recurrence run as a parallel scan.

From "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
Models" (De et al., 2024, arXiv:2402.19427); Hawk is the paper's attention-free model.
Each residual block is x + RecurrentBlock(norm(x)) then x + MLP(norm(x)); the recurrent
block multiplies a GELU gate branch with a branch that goes through a short causal
depthwise convolution and the Real-Gated Linear Recurrent Unit:

    r_t = sigmoid(W_r u_t + b_r)          recurrence gate
    i_t = sigmoid(W_i u_t + b_i)          input gate
    a_t = sigmoid(lambda) ** (c * r_t)    per-channel decay, c = 8
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)

Because a_t does not depend on h, h_t = a_t * h_{t-1} + b_t is an associative recurrence and
`jax.lax.associative_scan` computes the whole sequence in O(log S) depth. A segment start sets
a_t = 0 (and lets the input through unscaled), so packed documents never share state.
Names: B batch, S sequence, D d_model, R rnn width, H gate blocks, E = R/H, K conv taps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.layers import Dense, dtype_of, normal_init
from jaxlm.models.lm import ACT_BxSxD, LanguageModel, mlp, norm, out_init_std
from jaxlm.models.rnn import carried_state, row_resets

GATE_EXPONENT = 8.0  # c in a_t = a ** (c * r_t), as in the paper
DECAY_INIT = (0.9, 0.999)  # a ** c drawn uniformly from this range at initialisation


def linear_scan(a_BxSxN: jax.Array, b_BxSxN: jax.Array, h0_BxN: jax.Array) -> jax.Array:
    """h_t = a_t * h_{t-1} + b_t for all t at once (parallel prefix over the time axis)."""
    b_BxSxN = b_BxSxN.at[:, 0].add(a_BxSxN[:, 0] * h0_BxN)

    def compose(earlier, later):
        # Applying (a1, b1) then (a2, b2) to h is h -> a2 * (a1 * h + b1) + b2.
        a1, b1 = earlier
        a2, b2 = later
        return a1 * a2, a2 * b1 + b2

    _, h_BxSxN = jax.lax.associative_scan(compose, (a_BxSxN, b_BxSxN), axis=1)
    return h_BxSxN


def linear_scan_sequential(a_BxSxN: jax.Array, b_BxSxN: jax.Array, h0_BxN: jax.Array) -> jax.Array:
    """The same recurrence one step at a time with lax.scan (the reference for tests)."""

    def step(h_BxN, ab):
        h_BxN = ab[0] * h_BxN + ab[1]
        return h_BxN, h_BxN

    xs = (jnp.swapaxes(a_BxSxN, 0, 1), jnp.swapaxes(b_BxSxN, 0, 1))
    _, h_SxBxN = jax.lax.scan(step, h0_BxN, xs)
    return jnp.swapaxes(h_SxBxN, 0, 1)


def _decay_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """lambda such that sigmoid(lambda) ** c is uniform in DECAY_INIT (long, varied memory)."""
    lo, hi = DECAY_INIT
    a_c = jax.random.uniform(key, shape, jnp.float32, lo, hi)
    a = a_c ** (1.0 / GATE_EXPONENT)
    return (jnp.log(a) - jnp.log1p(-a)).astype(dtype)


class CausalConv(nn.Module):
    """Depthwise causal convolution over time whose taps never cross a segment boundary."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxSxR: jax.Array, segment_ids_BxS: jax.Array) -> jax.Array:
        k, (b, s, r) = self.cfg.conv_width, x_BxSxR.shape
        kernel_KxR = self.param("kernel", normal_init(k**-0.5, (None, "rnn")), (k, r), jnp.float32)
        bias_R = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("rnn",)), (r,)
        )
        # The last K-1 inputs (and their segments) before this call: zeros at a row's start.
        past, save = carried_state(
            self,
            self.decode,
            {"inputs": ((b, k - 1, r), x_BxSxR.dtype), "segment_ids": ((b, k - 1), jnp.int32)},
        )
        xs_BxTxR = jnp.concatenate([past["inputs"], x_BxSxR], axis=1)
        segs_BxT = jnp.concatenate([past["segment_ids"], segment_ids_BxS.astype(jnp.int32)], 1)
        save({"inputs": xs_BxTxR[:, s:], "segment_ids": segs_BxT[:, s:]})
        out_BxSxR = jnp.broadcast_to(bias_R.astype(x_BxSxR.dtype), x_BxSxR.shape)
        for lag in range(k):
            start = k - 1 - lag
            same_BxSx1 = (segs_BxT[:, start : start + s] == segment_ids_BxS)[..., None]
            tap_BxSxR = xs_BxTxR[:, start : start + s] * kernel_KxR[lag].astype(x_BxSxR.dtype)
            out_BxSxR = out_BxSxR + jnp.where(same_BxSx1, tap_BxSxR, 0)
        return out_BxSxR


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit with block-diagonal gate weights (H blocks)."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, u_BxSxR: jax.Array, reset_BxS: jax.Array) -> jax.Array:
        cfg = self.cfg
        (b, s, r), h = u_BxSxR.shape, cfg.n_heads
        e = r // h
        kernel = self.param(
            "kernel", normal_init(e**-0.5, ("heads", None, None, None)), (h, e, 2, e), jnp.float32
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", None)),
            (2, h, e),
        )
        decay_R = self.param(
            "decay", nn.with_logical_partitioning(_decay_init, ("rnn",)), (r,), jnp.float32
        )
        u_BxSxHxE = u_BxSxR.reshape(b, s, h, e)
        gates_BxSx2xHxE = jnp.einsum(
            "bshe,hegf->bsghf",
            u_BxSxHxE,
            kernel.astype(u_BxSxR.dtype),
            preferred_element_type=jnp.float32,
        )
        gates_BxSx2xR = jax.nn.sigmoid(gates_BxSx2xHxE + bias).reshape(b, s, 2, r)
        rec_BxSxR, inp_BxSxR = gates_BxSx2xR[:, :, 0], gates_BxSx2xR[:, :, 1]

        # log a_t = c * r_t * log sigmoid(lambda), kept in log space for precision near 1.
        log_a_BxSxR = -GATE_EXPONENT * rec_BxSxR * jax.nn.softplus(-decay_R)
        a_BxSxR = jnp.exp(log_a_BxSxR)
        # sqrt(1 - a^2), floored so its gradient stays finite if a ever reaches 1.
        scale_BxSxR = jnp.sqrt(jnp.maximum(-jnp.expm1(2.0 * log_a_BxSxR), 1e-12))
        reset_BxSx1 = reset_BxS[..., None]
        a_BxSxR = jnp.where(reset_BxSx1, 0.0, a_BxSxR)
        scale_BxSxR = jnp.where(reset_BxSx1, 1.0, scale_BxSxR)
        x_BxSxR = scale_BxSxR * inp_BxSxR * u_BxSxR.astype(jnp.float32)

        state, save = carried_state(self, self.decode, {"h": ((b, r), jnp.float32)})
        h_BxSxR = linear_scan(a_BxSxR, x_BxSxR, state["h"])
        save({"h": h_BxSxR[:, -1]})
        return h_BxSxR.astype(u_BxSxR.dtype)


class RecurrentBlock(nn.Module):
    """GELU(W_g x) * RG-LRU(conv(W_u x)), projected back to d_model."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(
        self, x_BxSxD: jax.Array, segment_ids_BxS: jax.Array, reset_BxS: jax.Array
    ) -> jax.Array:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        dense = lambda f, axes, std, name: Dense(  # noqa: E731
            f, axes, use_bias=cfg.bias, std=std, dtype=dtype, name=name
        )
        act = ("batch", "length", "act_rnn")
        gate_BxSxR = nn.gelu(dense(cfg.rnn_dim, ("embed", "rnn"), cfg.init_std, "gate")(x_BxSxD))
        u_BxSxR = dense(cfg.rnn_dim, ("embed", "rnn"), cfg.init_std, "input")(x_BxSxD)
        u_BxSxR = nn.with_logical_constraint(u_BxSxR, act)
        u_BxSxR = CausalConv(cfg, self.decode, name="conv")(u_BxSxR, segment_ids_BxS)
        h_BxSxR = RGLRU(cfg, self.decode, name="rg_lru")(u_BxSxR, reset_BxS)
        h_BxSxR = nn.with_logical_constraint(h_BxSxR * gate_BxSxR, act)
        return dense(cfg.d_model, ("rnn", "embed"), out_init_std(cfg), "out")(h_BxSxR)


class HawkBlock(nn.Module):
    """x + RecurrentBlock(norm(x)), then x + MLP(norm(x))."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxSxD: jax.Array,
        segment_ids_BxS: jax.Array,
        reset_BxS: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.cfg
        h_BxSxD = RecurrentBlock(cfg, self.decode, name="recurrent")(
            norm(cfg, "rnn_norm")(x_BxSxD), segment_ids_BxS, reset_BxS
        )
        x_BxSxD = x_BxSxD + nn.Dropout(cfg.dropout)(h_BxSxD, deterministic=deterministic)
        x_BxSxD = x_BxSxD + mlp(cfg)(norm(cfg, "mlp_norm")(x_BxSxD), deterministic)
        return nn.with_logical_constraint(x_BxSxD, ACT_BxSxD)


class HawkLM(LanguageModel):
    """tokens_BxS -> logits_BxSxV through n_layers Hawk blocks; positions are not needed."""

    scale_embeddings = True

    def blocks(
        self,
        x_BxSxD: jax.Array,
        positions_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        deterministic: bool,
    ) -> jax.Array:
        """n_layers Hawk blocks, their recurrences reset where a new segment starts."""
        cfg = self.cfg
        del positions_BxS  # the convolution and recurrence see order directly
        reset_BxS = row_resets(self, self.decode, segment_ids_BxS)
        for i in range(cfg.n_layers):
            x_BxSxD = HawkBlock(cfg, self.decode, name=f"block_{i}")(
                x_BxSxD, segment_ids_BxS, reset_BxS, deterministic
            )
        return x_BxSxD
