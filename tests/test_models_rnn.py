"""Tests of what only the recurrent LMs (LSTM, GRU, Hawk) have: flax cell equivalence, the
parallel scan, the RG-LRU's decay, unbounded generation and the bidirectional encoder. The
invariants all families share (causality, packed documents, cached decode == full forward,
axis names, parameter counts, bfloat16) are in test_models.py, the recurrent configs in
test_config.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, random_tokens, resolved_model

from jaxlm.config import ModelConfig
from jaxlm.inference.generate import generate
from jaxlm.models.hawk import GATE_EXPONENT, linear_scan, linear_scan_sequential
from jaxlm.models.rnn import GatedLayer, RecurrentEncoder, gru_step, lstm_step

S, V = 12, 64


def tiny_cfg(family: str, **overrides) -> ModelConfig:
    """A resolved two-layer model with an untied head (so greedy output isn't the input)."""
    kw = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, init_std=0.3, tie_embeddings=False)
    return resolved_model(family, **{**kw, **overrides})


# --- cells against flax.linen ----------------------------------------------------------------


def _fused_from_flax(cell: str, p: dict) -> tuple[dict, jax.Array | None]:
    """Stack flax's per-gate Dense params into our (I, G, D) kernels and (G, D) bias."""
    gates = "ifgo" if cell == "lstm" else "rzn"
    stack = lambda prefix, leaf: jnp.stack([p[prefix + g][leaf] for g in gates], axis=-2)  # noqa: E731
    ours = {"input_kernel": stack("i", "kernel"), "recurrent_kernel": stack("h", "kernel")}
    if cell == "lstm":  # flax puts LSTM biases on the hidden side, GRU's on the input side
        ours["bias"] = stack("h", "bias")
    else:
        ours["bias"] = stack("i", "bias")
        ours["candidate_bias"] = p["hn"]["bias"]
    return ours


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_matches_flax_given_the_same_weights(cell):
    d, steps = 8, 5
    flax_cell = (nn.LSTMCell if cell == "lstm" else nn.GRUCell)(features=d)
    k_init, k_x, k_b = jax.random.split(jax.random.PRNGKey(0), 3)
    xs_SxBxD = jax.random.normal(k_x, (steps, 3, d))
    carry = flax_cell.initialize_carry(k_init, (3, d))
    p = flax_cell.init(k_init, carry, xs_SxBxD[0])["params"]
    # Nonzero biases, so a misplaced bias (e.g. the GRU's b_hn outside the reset gate) shows.
    p = jax.tree.map(lambda w: w + 0.5 * jax.random.normal(k_b, w.shape), p)
    ours = _fused_from_flax(cell, p)

    state = {"c": carry[0], "h": carry[1]} if cell == "lstm" else {"h": carry}
    for t in range(steps):
        carry, h_flax = flax_cell.apply({"params": p}, carry, xs_SxBxD[t])
        xw = jnp.einsum("bi,igd->bgd", xs_SxBxD[t], ours["input_kernel"]) + ours["bias"]
        if cell == "lstm":
            state, h_ours = lstm_step(ours["recurrent_kernel"], state, xw)
        else:
            state, h_ours = gru_step(ours["recurrent_kernel"], ours["candidate_bias"], state, xw)
        np.testing.assert_allclose(h_ours, h_flax, atol=1e-6, rtol=0)
    assert float(jnp.abs(h_flax).max()) > 0.1

    # The whole layer (one input matmul, then the scan) equals flax's nn.RNN over time.
    xs_BxSxD = jnp.swapaxes(xs_SxBxD, 0, 1)
    rnn_out = nn.RNN(flax_cell).apply({"params": {"cell": p}}, xs_BxSxD)
    cfg = tiny_cfg(cell, d_model=d)
    no_reset = jnp.zeros(xs_BxSxD.shape[:2], bool)
    layer_out = GatedLayer(cfg, cell).apply({"params": ours}, xs_BxSxD, no_reset)
    np.testing.assert_allclose(layer_out, rnn_out, atol=1e-6, rtol=0)


# --- the parallel scan -----------------------------------------------------------------------


def test_parallel_scan_equals_sequential_values_and_gradients():
    ka, kb, kh, kc = jax.random.split(jax.random.PRNGKey(1), 4)
    a = jax.random.uniform(ka, (2, 37, 5), minval=0.5, maxval=1.0)
    a = a.at[:, 17].set(0.0)  # a segment start inside the row
    b = jax.random.normal(kb, (2, 37, 5))
    h0 = jax.random.normal(kh, (2, 5))
    parallel, sequential = jax.jit(linear_scan), jax.jit(linear_scan_sequential)
    np.testing.assert_allclose(parallel(a, b, h0), sequential(a, b, h0), atol=1e-5, rtol=1e-5)
    cot = jax.random.normal(kc, a.shape)
    grads = [
        jax.jit(jax.grad(lambda *x, f=f: jnp.sum(f(*x) * cot), argnums=(0, 1, 2)))(a, b, h0)
        for f in (parallel, sequential)
    ]
    for g_par, g_seq in zip(*grads, strict=True):
        assert float(jnp.abs(g_seq).max()) > 1e-2
        np.testing.assert_allclose(g_par, g_seq, atol=1e-4, rtol=1e-4)
    # The zero at t=17 cuts the history: nothing before it reaches h[17:].
    h_cut = parallel(a, b.at[:, :17].set(0.0), jnp.zeros_like(h0))
    np.testing.assert_allclose(h_cut[:, 17:], parallel(a, b, h0)[:, 17:], atol=1e-6)


def test_rg_lru_decay_starts_in_the_papers_range():
    params = init_params(tiny_cfg("hawk"), S)
    decay_logit = np.asarray(params["block_0"]["recurrent"]["rg_lru"]["decay"], np.float64)
    a_c = (1.0 / (1.0 + np.exp(-decay_logit))) ** GATE_EXPONENT  # sigmoid(lambda) ** c
    assert 0.9 <= a_c.min() < a_c.max() <= 0.999


# --- generation ------------------------------------------------------------------------------


def test_recurrent_generation_is_not_bounded_by_max_seq_len():
    cfg = tiny_cfg("gru", max_seq_len=8)
    (out,) = generate(cfg, init_params(cfg, S), [1, 2, 3], 20)
    assert len(out) == 20


# --- the bidirectional encoder ---------------------------------------------------------------


def test_bidirectional_encoder_sees_both_sides_within_a_segment():
    cfg = tiny_cfg("gru")
    enc = RecurrentEncoder(cfg)
    tokens = random_tokens(6, (S,), V)[None]
    seg = np.r_[np.ones(6), np.full(6, 2)].astype(np.int32)[None]
    params = enc.init(jax.random.PRNGKey(0), jnp.asarray(tokens), jnp.asarray(seg))["params"]
    run = jax.jit(lambda t: enc.apply({"params": params}, t, jnp.asarray(seg)))
    base = np.asarray(run(jnp.asarray(tokens)))
    assert base.shape == (1, S, 2 * cfg.d_model)
    changed = tokens.copy()
    changed[0, 3] = (changed[0, 3] + 1) % V  # a token of document 1
    diff = np.abs(np.asarray(run(jnp.asarray(changed))) - base).max(-1)[0]
    assert np.all(diff[:6] > 1e-4)  # seen by earlier positions (backward) and later (forward)
    np.testing.assert_allclose(diff[6:], 0.0, atol=1e-6)  # document 2 is untouched
