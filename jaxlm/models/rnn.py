"""Recurrent language models: stacked LSTM and GRU LMs and a bidirectional encoder.

The LM is a `LanguageModel` (jaxlm.models.lm) that supplies only its stack of recurrent
layers. Positions are ignored (order lives in the recurrence); a change of segment id
resets the recurrent state, so packed documents never see each other. With `decode=True`
each layer keeps its final state in the flax `cache` collection and the next call
continues from it: generation costs O(1) per token whatever the length.

Cells follow `flax.linen.LSTMCell` / `GRUCell` exactly (gate order i, f, g, o; the GRU's
reset gate multiplies the hidden-side candidate term *including* its bias). Input
projections for all timesteps are one matmul outside the time loop; only h @ W_h remains
inside `lax.scan`. Names: B batch, S sequence, D d_model (= hidden width), G gates, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.layers import dtype_of, normal_init
from jaxlm.models.lm import ACT_BxSxD, LanguageModel, default_segments, embed, norm

GATES = {"lstm": 4, "gru": 3}
State = dict[str, jax.Array]


# --------------------------------------------------------------------------- cell math


def lstm_step(w_h_DxGxD: jax.Array, state: State, xw_BxGxD: jax.Array) -> tuple[State, jax.Array]:
    """One LSTM step from the precomputed input term xw = x @ W_x + b (gates i, f, g, o)."""
    pre_BxGxD = xw_BxGxD + jnp.einsum(
        "bd,dge->bge",
        state["h"].astype(w_h_DxGxD.dtype),
        w_h_DxGxD,
        preferred_element_type=jnp.float32,
    )
    i, f, g, o = (pre_BxGxD[:, k] for k in range(4))
    c_BxD = jax.nn.sigmoid(f) * state["c"] + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_BxD = jax.nn.sigmoid(o) * jnp.tanh(c_BxD)
    return {"c": c_BxD, "h": h_BxD}, h_BxD


def gru_step(
    w_h_DxGxD: jax.Array, b_hn_D: jax.Array, state: State, xw_BxGxD: jax.Array
) -> tuple[State, jax.Array]:
    """One GRU step (gates r, z, n) with flax's convention: n = tanh(x_n + r*(W_hn h + b_hn))."""
    h_BxD = state["h"]
    hw_BxGxD = jnp.einsum(
        "bd,dge->bge", h_BxD.astype(w_h_DxGxD.dtype), w_h_DxGxD, preferred_element_type=jnp.float32
    )
    r = jax.nn.sigmoid(xw_BxGxD[:, 0] + hw_BxGxD[:, 0])
    z = jax.nn.sigmoid(xw_BxGxD[:, 1] + hw_BxGxD[:, 1])
    n = jnp.tanh(xw_BxGxD[:, 2] + r * (hw_BxGxD[:, 2] + b_hn_D))
    h_BxD = (1.0 - z) * n + z * h_BxD
    return {"h": h_BxD}, h_BxD


def scan_cell(
    step: Callable[[State, jax.Array], tuple[State, jax.Array]],
    state: State,
    xw_BxSxGxD: jax.Array,
    reset_BxS: jax.Array,
    reverse: bool = False,
) -> tuple[jax.Array, State]:
    """Run `step` over time with lax.scan, zeroing the state where `reset` is set."""

    def body(carry: State, inputs: tuple[jax.Array, jax.Array]):
        xw_BxGxD, reset_B = inputs
        carry = jax.tree.map(lambda v: jnp.where(reset_B[:, None], 0.0, v), carry)
        return step(carry, xw_BxGxD)

    xs = (jnp.swapaxes(xw_BxSxGxD, 0, 1), jnp.swapaxes(reset_BxS, 0, 1))
    state, h_SxBxD = jax.lax.scan(body, state, xs, reverse=reverse)
    return jnp.swapaxes(h_SxBxD, 0, 1), state


def segment_starts(segment_ids_BxS: jax.Array, prev_segment_B: jax.Array) -> jax.Array:
    """True where a token's segment differs from the one before it (the row starts after prev)."""
    before_BxS = jnp.concatenate([prev_segment_B[:, None], segment_ids_BxS[:, :-1]], axis=1)
    return segment_ids_BxS != before_BxS


# ------------------------------------------------------------------------ decode state


def carried_state(
    module: nn.Module, decode: bool, spec: dict[str, tuple[tuple[int, ...], Any]]
) -> tuple[State, Callable[[State], None]]:
    """(state, save): what the last decode call left in `cache` (zeros otherwise), and a setter.

    `spec` maps names to (shape, dtype). The cache is created by `init` and starts at zero,
    which is also the state of a fresh sequence.
    """
    zeros = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
    if not decode:
        return zeros, lambda new: None
    ready = module.has_variable("cache", next(iter(spec)))
    cached = {k: module.variable("cache", k, jnp.zeros, *sd) for k, sd in spec.items()}
    if not ready:  # init only sizes the cache
        return zeros, lambda new: None

    def save(new: State) -> None:
        for k, v in new.items():
            cached[k].value = v.astype(spec[k][1])

    return {k: v.value for k, v in cached.items()}, save


def row_resets(module: nn.Module, decode: bool, segment_ids_BxS: jax.Array) -> jax.Array:
    """Segment starts of this call's tokens, continuing the previous decode call's row."""
    b = segment_ids_BxS.shape[0]
    segment_ids_BxS = segment_ids_BxS.astype(jnp.int32)
    state, save = carried_state(module, decode, {"last_segment_id": ((b,), jnp.int32)})
    save({"last_segment_id": segment_ids_BxS[:, -1]})
    return segment_starts(segment_ids_BxS, state["last_segment_id"])


# ----------------------------------------------------------------------------- modules


def _gate_bias_init(cell: str):
    """Zeros, except an LSTM forget gate bias of 1 so early gradients flow through time."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        bias = jnp.zeros(shape, dtype)
        return bias.at[1].set(1.0) if cell == "lstm" else bias

    return nn.with_logical_partitioning(init, (None, "rnn"))


class GatedLayer(nn.Module):
    """One LSTM or GRU layer over a whole sequence: x_BxSxI -> h_BxSxD."""

    cfg: ModelConfig
    cell: str
    decode: bool = False
    reverse: bool = False

    @nn.compact
    def __call__(self, x_BxSxI: jax.Array, reset_BxS: jax.Array) -> jax.Array:
        d, g, i = self.cfg.d_model, GATES[self.cell], x_BxSxI.shape[-1]
        dtype = dtype_of(self.cfg.dtype)
        w_x = self.param(
            "input_kernel", normal_init(i**-0.5, ("embed", None, "rnn")), (i, g, d), jnp.float32
        )
        # The recurrent kernel's input dim stays whole: it is contracted with the carried state
        # at every step, and an fsdp-sharded layout there gave XLA's partitioner wrong input
        # gradients (data=2, fsdp=2, tensor=2 on CPU, jax 0.10.2).
        w_h = self.param(
            "recurrent_kernel", normal_init(d**-0.5, (None, None, "rnn")), (d, g, d), jnp.float32
        )
        bias = self.param("bias", _gate_bias_init(self.cell), (g, d), jnp.float32)
        # The input side of every gate for every timestep, as one matmul.
        xw_BxSxGxD = (
            jnp.einsum(
                "bsi,igd->bsgd",
                x_BxSxI.astype(dtype),
                w_x.astype(dtype),
                preferred_element_type=jnp.float32,
            )
            + bias
        )
        if self.cell == "lstm":
            step = lambda s, xw: lstm_step(w_h.astype(dtype), s, xw)  # noqa: E731
            names = ("c", "h")
        else:
            zeros_D = nn.with_logical_partitioning(nn.initializers.zeros, ("rnn",))
            b_hn = self.param("candidate_bias", zeros_D, (d,), jnp.float32)
            step = lambda s, xw: gru_step(w_h.astype(dtype), b_hn, s, xw)  # noqa: E731
            names = ("h",)
        b = x_BxSxI.shape[0]
        state, save = carried_state(self, self.decode, {n: ((b, d), jnp.float32) for n in names})
        h_BxSxD, state = scan_cell(step, state, xw_BxSxGxD, reset_BxS, self.reverse)
        save(state)
        return h_BxSxD.astype(dtype)


class RecurrentLM(LanguageModel):
    """Embedding -> n_layers LSTM/GRU layers (residual, dropout) -> norm -> head."""

    scale_embeddings = True

    def blocks(
        self,
        x_BxSxD: jax.Array,
        positions_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        deterministic: bool,
    ) -> jax.Array:
        """n_layers recurrences, each state reset where a new segment starts."""
        cfg = self.cfg
        del positions_BxS  # order is carried by the recurrence itself
        reset_BxS = row_resets(self, self.decode, segment_ids_BxS)
        for i in range(cfg.n_layers):
            h_BxSxD = GatedLayer(cfg, cfg.family, self.decode, name=f"layer_{i}")(
                x_BxSxD, reset_BxS
            )
            h_BxSxD = nn.Dropout(cfg.dropout)(h_BxSxD, deterministic=deterministic)
            x_BxSxD = x_BxSxD + h_BxSxD if cfg.rnn_residual else h_BxSxD
            x_BxSxD = nn.with_logical_constraint(x_BxSxD, ACT_BxSxD)
        return x_BxSxD


class RecurrentEncoder(nn.Module):
    """Bidirectional LSTM/GRU encoder: tokens_BxS -> features_BxSx2D (forward ++ backward).

    Each layer runs one recurrence left to right and another right to left over the row and
    concatenates them; the backward one resets where a segment *ends*, so packed documents
    stay apart in both directions. Layers after the first add a residual when enabled.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxS: jax.Array,
        segment_ids_BxS: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.cfg
        segment_ids_BxS = default_segments(tokens_BxS, segment_ids_BxS).astype(jnp.int32)
        none_B = jnp.zeros(tokens_BxS.shape[:1], jnp.int32)
        starts_BxS = segment_starts(segment_ids_BxS, none_B)
        ends_BxS = segment_starts(segment_ids_BxS[:, ::-1], none_B)[:, ::-1]
        x_BxSxI, _ = embed(cfg, tokens_BxS, scale=True)
        x_BxSxI = nn.Dropout(cfg.dropout)(x_BxSxI, deterministic=deterministic)
        for i in range(cfg.n_layers):
            fwd_BxSxD = GatedLayer(cfg, cfg.family, name=f"forward_{i}")(x_BxSxI, starts_BxS)
            bwd_BxSxD = GatedLayer(cfg, cfg.family, reverse=True, name=f"backward_{i}")(
                x_BxSxI, ends_BxS
            )
            h_BxSx2D = jnp.concatenate([fwd_BxSxD, bwd_BxSxD], axis=-1)
            h_BxSx2D = nn.Dropout(cfg.dropout)(h_BxSx2D, deterministic=deterministic)
            residual = cfg.rnn_residual and i > 0
            x_BxSxI = x_BxSxI + h_BxSx2D if residual else h_BxSx2D
        return norm(cfg, "final_norm")(x_BxSxI)
