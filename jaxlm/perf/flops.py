"""FLOP accounting: matmul parameters, FLOPs per token for every family, MFU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models import build_model


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: blocks plus the output head.

    The input embedding is a lookup, not a matmul, so it is excluded (a tied head is counted
    once, as the head).
    """
    if cfg.recurrent:
        return _recurrent_matmul_params(cfg) + cfg.d_model * cfg.vocab_size
    d, e = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * e * 2 + d * cfg.kv_heads * e * 2  # q, out; k, v
    mlp = _mlp_weights(cfg, cfg.ff_dim)
    n_moe = cfg.moe_layers
    # A MoE layer's token meets its router, its top-k experts and the shared experts only.
    moe = d * cfg.moe_experts + (cfg.moe_top_k + cfg.moe_shared_experts) * _mlp_weights(
        cfg, cfg.moe_ff_dim
    )
    return cfg.n_layers * attn + (cfg.n_layers - n_moe) * mlp + n_moe * moe + d * cfg.vocab_size


def _mlp_weights(cfg: ModelConfig, width: int) -> int:
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * width


def inactive_params(cfg: ModelConfig) -> int:
    """Parameters a token never touches: the experts it is not routed to (0 when dense)."""
    if not cfg.moe_experts:
        return 0
    per_expert = _mlp_weights(cfg, cfg.moe_ff_dim)
    if cfg.bias:
        per_expert += cfg.moe_ff_dim + cfg.d_model
    return cfg.moe_layers * (cfg.moe_experts - cfg.moe_top_k) * per_expert


def _recurrent_matmul_params(cfg: ModelConfig) -> int:
    """Multiply-add weights per token of the recurrent layers (see jaxlm.models.rnn/hawk).

    LSTM/GRU: input and recurrent kernels, d x gates x d each. Hawk: gate, input and output
    projections, the two block-diagonal RG-LRU gates (n_heads blocks of E x E), the
    depthwise conv taps (one multiply-add each per token) and the MLP.
    """
    d = cfg.d_model
    if cfg.family in ("lstm", "gru"):
        gates = 4 if cfg.family == "lstm" else 3
        return cfg.n_layers * 2 * d * gates * d
    r = cfg.rnn_dim
    rg_lru = 2 * r * (r // cfg.n_heads)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.ff_dim
    return cfg.n_layers * (3 * d * r + rg_lru + cfg.conv_width * r + mlp)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Score and value matmuls per token with causal halving: 2*S*d per layer forward.

    QK^T and AV cost 2*S*d multiply-adds each for a query that sees all S keys; a causal
    query sees S/2 on average, so the forward pass is 2*S*d FLOPs per layer and training
    (forward + 2x backward) 6*S*d. This is the convention of MaxText and FlashAttention;
    PaLM's appendix counts the full square (twice this).
    """
    if cfg.recurrent:
        return 0.0
    return (6.0 if training else 2.0) * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 6*N_matmul for training (2*N forward) plus causal attention.

    N_matmul counts every weight that takes part in a matmul (embedding lookups excluded,
    the output head included); in a mixture of experts only the router, the top-k experts
    and the shared experts a token passes through; recurrent families count their own
    input, recurrent, gate and convolution weights. Elementwise work (norms, activations, softmax, the optimizer,
    the recurrences' gating) is not model FLOPs, as in every MFU convention.
    """
    mult = 6 if training else 2
    return float(mult * matmul_params(cfg)) + attention_flops_per_token(cfg, seq_len, training)


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters of the model a config describes (shapes only, nothing allocated)."""

    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda t: build_model(cfg).init(jax.random.PRNGKey(0), t), tokens)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes.get("params", {})))


def active_param_count(cfg: ModelConfig) -> int:
    """Parameters each token uses: `param_count` less the experts it is not routed to."""
    return param_count(cfg) - inactive_params(cfg)


def mfu(tokens_per_sec: float, fpt: float, peak_per_device: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    return tokens_per_sec * fpt / (peak_per_device * max(n_devices, 1))
