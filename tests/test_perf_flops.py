"""jaxlm.perf.flops: FLOPs per token against XLA's cost analysis for every family, the
convention by hand on the shipped configs, and MFU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import loaded_model, next_token_loss

from jaxlm import config as config_lib
from jaxlm.models import build_model
from jaxlm.perf.flops import attention_flops_per_token, flops_per_token, mfu, param_count

B, S = 2, 64  # loaded_model's sequence length


@pytest.mark.parametrize("family", ["llama", "gpt2", "lstm", "gru", "hawk"])
def test_flops_match_xla_cost_analysis(family):
    """Our training FLOPs vs XLA's count for the compiled forward+backward, within 5%.

    What XLA counts that we don't: elementwise work (norms, activations, softmax, the loss,
    the recurrences' gating and the Hawk scan), and the masked half of causal attention
    (the XLA kernel computes the whole square; we halve it), which is added back here.
    What XLA counts less: HloCostAnalysis counts a while loop's body once, not once per
    step, so for LSTM/GRU the recurrent matmul inside `lax.scan` appears for one timestep.
    """
    cfg = loaded_model(family)
    model = build_model(cfg)
    tokens = jnp.zeros((B, S), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    compiled = jax.jit(jax.grad(next_token_loss(model))).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])

    expected = (flops_per_token(cfg, S) + attention_flops_per_token(cfg, S)) * B * S
    if family in ("lstm", "gru"):
        gates = 4 if family == "lstm" else 3
        recurrent = 6 * cfg.n_layers * cfg.d_model * gates * cfg.d_model * B
        expected -= recurrent * (S - 1)
    assert xla == pytest.approx(expected, rel=0.05)
    assert xla >= 0.99 * expected  # elementwise work only ever adds


def test_flops_convention_on_the_bench_model():
    """6*N_matmul plus causal attention 6*L*S*d per token, by hand for configs/bench-cpu.yaml."""
    cfg = config_lib.load_config("configs/bench-cpu.yaml").model
    d, f, v, L, s = 512, 2048, 8192, 6, 256
    n_matmul = L * (4 * d * d + 3 * d * f) + d * v
    assert flops_per_token(cfg, s) == 6 * n_matmul + 6 * L * s * d
    assert flops_per_token(cfg, s, training=False) == 2 * n_matmul + 2 * L * s * d
    # Embedding (input) and head are separate: counted params include the embedding.
    assert param_count(cfg) == n_matmul + d * v + (2 * L + 1) * d
    assert mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)


def test_gpt2_small_config_is_the_124m_model():
    """configs/gpt2-small.yaml (the GPU MFU check) is GPT-2 small: 124M parameters, with the
    tied head counted once, at sequence 1024 in bfloat16."""
    cfg = config_lib.load_config("configs/gpt2-small.yaml")
    m = cfg.model
    assert (m.family, m.tie_embeddings, m.dtype, cfg.data.seq_len) == (
        "gpt2",
        True,
        "bfloat16",
        1024,
    )
    assert round(param_count(m) / 1e6) == 124
    assert flops_per_token(m, 1024) == pytest.approx(7.99e8, rel=0.01)
