"""Property tests of the language models. Every family (Transformer, LSTM/GRU, Hawk) shares
one wrapper, so the invariants run over all five: causality, packed documents, cached decode
== full forward, logical axis names, weight tying, parameter counts, mixed precision, the
hidden state the head reads. Then the Transformer's own: positions and attention
implementations (the attention functions themselves are in test_models_attention.py)."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, TINY_LM, TRANSFORMERS, init_params, random_tokens, resolved_model

from jaxlm.config import ModelConfig, load_config
from jaxlm.inference.generate import generate
from jaxlm.models import build_model
from jaxlm.parallel.sharding import LOGICAL_RULES
from jaxlm.perf.flops import flops_per_token, matmul_params
from jaxlm.train.state import param_count

B, S, V = 2, 16, 64
PARAM_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "rnn", None}


def tiny_cfg(family: str, **overrides) -> ModelConfig:
    """A resolved two-layer model; Llama gets fewer kv heads than query heads (GQA).

    All but GPT-2 get an untied head, so greedy output isn't the input token and the token
    embedding is read on the input side only.
    """
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.1)
    return resolved_model(family, gqa=True, untied=True, **{**kw, **overrides})


@functools.cache
def forward_fn(cfg: ModelConfig):
    """One jitted forward per config: (params, tokens, positions, segment_ids) -> logits."""
    model = build_model(cfg)
    return jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg))


def forward(cfg, params, tokens_BxS, positions_BxS=None, segment_ids_BxS=None) -> np.ndarray:
    tokens_BxS = jnp.asarray(tokens_BxS, jnp.int32)
    if positions_BxS is None:
        positions_BxS = np.broadcast_to(np.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    if segment_ids_BxS is None:
        segment_ids_BxS = np.ones(tokens_BxS.shape, np.int32)
    logits = forward_fn(cfg)(
        params,
        tokens_BxS,
        jnp.asarray(positions_BxS, jnp.int32),
        jnp.asarray(segment_ids_BxS, jnp.int32),
    )
    return np.asarray(logits.astype(jnp.float32))


# --- causality and packing -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_future_tokens_do_not_leak(family):
    cfg = tiny_cfg(family)
    params = init_params(cfg, S)
    tokens = random_tokens(0, (S,), V)
    for t in (0, 6, S - 2):
        changed = tokens.copy()
        changed[t + 1 :] = (changed[t + 1 :] + 1 + np.arange(S - t - 1)) % V
        logits = forward(cfg, params, np.stack([tokens, changed]))
        np.testing.assert_allclose(logits[0, : t + 1], logits[1, : t + 1], atol=1e-6, rtol=0)
        assert np.abs(logits[0, t + 1 :] - logits[1, t + 1 :]).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_gradients_vanish_towards_the_future(family):
    """d logits[t] / d (input row used at position u) is nonzero exactly for u <= t."""
    cfg = tiny_cfg(family)
    params = init_params(cfg, S)
    model = build_model(cfg)
    tokens_1xS = np.random.default_rng(1).permutation(V)[:S][None].astype(np.int32)
    # A table read only on the input side, with one distinct row per position: learned
    # positions (GPT-2 ties the token embedding to the head), else the token embedding.
    table, rows = (
        ("pos_embed", np.arange(S)) if cfg.position == "learned" else ("embed", tokens_1xS[0])
    )
    t = 5

    def logit_sum_at_t(weights):
        p = {**params, table: {"embedding": weights}}
        return model.apply({"params": p}, jnp.asarray(tokens_1xS))[0, t].sum()

    grad = jax.jit(jax.grad(logit_sum_at_t))(params[table]["embedding"])
    grad = np.abs(np.asarray(grad)).sum(-1)
    assert np.all(grad[rows[: t + 1]] > 0)
    assert np.all(grad[rows[t + 1 :]] == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_are_isolated(family):
    cfg = tiny_cfg(family)
    params = init_params(cfg, S)
    la, lb = 6, S - 6
    doc_a, doc_b = random_tokens(2, (la,), V), random_tokens(3, (lb,), V)
    other_a = (doc_a + 7) % V
    packed_seg = np.r_[np.ones(la), np.full(lb, 2)].astype(np.int32)
    packed_pos = np.r_[np.arange(la), np.arange(lb)]
    packed = forward(
        cfg,
        params,
        np.stack([np.r_[doc_a, doc_b], np.r_[other_a, doc_b]]),
        np.stack([packed_pos, packed_pos]),
        np.stack([packed_seg, packed_seg]),
    )
    # Changing document A leaves B untouched (and does change A's own logits).
    np.testing.assert_allclose(packed[0, la:], packed[1, la:], atol=1e-6, rtol=0)
    assert np.abs(packed[0, :la] - packed[1, :la]).max() > 1e-4

    # B packed behind A equals B alone at the start of a row followed by padding.
    alone_tokens = np.r_[doc_b, np.zeros(la, np.int32)]
    alone_seg = np.r_[np.ones(lb), np.zeros(la)].astype(np.int32)
    alone = forward(
        cfg,
        params,
        np.stack([alone_tokens, alone_tokens]),
        np.stack([np.arange(S), np.arange(S)]),
        np.stack([alone_seg, alone_seg]),
    )
    np.testing.assert_allclose(packed[0, la:], alone[0, :lb], atol=1e-5, rtol=0)

    # Without segment ids B would see A: the isolation above is the mask's doing.
    unmasked = forward(cfg, params, np.stack([np.r_[doc_a, doc_b]] * 2), np.stack([packed_pos] * 2))
    assert np.abs(unmasked[0, la:] - alone[0, :lb]).max() > 1e-4


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_param_has_logical_axis_names(family):
    cfg = tiny_cfg(family)
    init = lambda: build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    boxed = jax.eval_shape(init)["params"]  # shapes and boxes only, nothing computed
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) == len(jax.tree.leaves(init_params(cfg, S)))
    rules = dict(LOGICAL_RULES)
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), type(leaf)
        assert len(leaf.names) == len(leaf.value.shape), (leaf.names, leaf.value.shape)
        assert set(leaf.names) <= PARAM_AXES, leaf.names
        assert all(n is None or n in rules for n in leaf.names)
    assert boxed["embed"]["embedding"].names == ("vocab", "embed")
    assert any("rnn" in leaf.names for leaf in leaves) == cfg.recurrent


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_tying(family):
    cfg = tiny_cfg(family)
    params = init_params(cfg, S)
    assert ("head" in params) == (not cfg.tie_embeddings)
    if not cfg.tie_embeddings:
        assert params["head"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)
    # Zeroing the embedding row of a token that is never an input zeroes its logit exactly
    # when the head is the embedding.
    unused = 0
    tokens = np.stack([random_tokens(7, (S,), V) % (V - 1) + 1] * 2)
    emb = params["embed"]["embedding"].at[unused].set(0.0)
    logits = forward(cfg, {**params, "embed": {"embedding": emb}}, tokens)
    if cfg.tie_embeddings:
        assert np.all(logits[..., unused] == 0.0)
    else:
        assert np.abs(logits[..., unused]).min() > 0.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [True, False])
def test_matmul_param_count_matches_the_tree(family, tie):
    cfg = tiny_cfg(family, tie_embeddings=tie)
    init = lambda: build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    params = nn.unbox(jax.eval_shape(init)["params"])  # shapes are all this test needs
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    size = lambda pred: sum(math.prod(x.shape) for path, x in flat if pred(path[-1].key))
    # Kernels: dense, recurrent input/recurrent and Hawk's convolution taps.
    kernels = size(lambda n: n.endswith("kernel"))
    embedding = size(lambda n: n == "embedding")
    head_from_embedding = cfg.vocab_size * cfg.d_model if tie else 0
    assert matmul_params(cfg) == kernels + head_from_embedding
    # Everything else is lookups (token and learned position embeddings), norms, biases and
    # Hawk's decay rates.
    others = size(lambda n: n in ("scale", "bias", "candidate_bias", "decay"))
    assert param_count(params) == kernels + embedding + others
    n_pos = cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0
    assert embedding == cfg.vocab_size * cfg.d_model + n_pos
    if cfg.recurrent:  # no attention: the cost per token does not grow with the length
        assert flops_per_token(cfg, 128) == flops_per_token(cfg, 1024) == 6 * matmul_params(cfg)


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(family):
    """A prefill call, then one call per token (KV cache or carried state), equals one pass."""
    cfg = tiny_cfg(family)
    params = init_params(cfg, S)
    tokens_BxS = np.stack([random_tokens(11, (S,), V), random_tokens(12, (S,), V)])
    seg_BxS = np.stack([np.r_[np.ones(7), np.full(S - 7, 2)], np.ones(S)]).astype(np.int32)
    pos_BxS = np.stack([np.r_[np.arange(7), np.arange(S - 7)], np.arange(S)]).astype(np.int32)
    full = forward(cfg, params, tokens_BxS, pos_BxS, seg_BxS)

    model = build_model(cfg, decode=True)
    init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((B, S), jnp.int32))
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(init)["cache"])

    @jax.jit
    def call(cache, tokens, pos, seg):
        logits, v = model.apply(
            {"params": params, "cache": cache}, tokens, pos, seg, mutable=["cache"]
        )
        return logits, v["cache"]

    prefill = 5
    outs = []
    for lo, hi in [(0, prefill)] + [(t, t + 1) for t in range(prefill, S)]:
        cols = slice(lo, hi)
        logits, cache = call(cache, tokens_BxS[:, cols], pos_BxS[:, cols], seg_BxS[:, cols])
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_full_forward_argmax(family):
    cfg = tiny_cfg(family)
    params = init_params(cfg, S)
    prompt, n_new = random_tokens(8, (5,), V).tolist(), 9
    (decoded,) = generate(cfg, params, prompt, n_new)
    assert len(decoded) == n_new

    seq = list(prompt)
    for _ in range(n_new):  # causality lets a padded row stand in for the prefix
        row = np.array(seq + [0] * (S - len(seq)), np.int32)
        logits = forward(cfg, params, np.stack([row, row]))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    assert decoded == seq[len(prompt) :]
    assert len(set(decoded)) > 1, "a constant continuation would make this test weak"

    # Greedy samples agree; eos truncates before the first eos.
    assert generate(cfg, params, prompt, n_new, num_samples=2) == [decoded, decoded]
    eos = decoded[3]
    (cut,) = generate(cfg, params, prompt, n_new, eos_id=eos)
    assert cut == decoded[: decoded.index(eos)]


# --- precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_is_close_to_float32(family):
    cfg = tiny_cfg(family)
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    init16 = lambda: build_model(cfg16).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    params16 = nn.unbox(jax.eval_shape(init16)["params"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))

    params = init_params(cfg, S)
    tokens = np.stack([random_tokens(9, (S,), V), random_tokens(10, (S,), V)])
    raw16 = forward_fn(cfg16)(
        params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(S), (B, S)), jnp.ones((B, S), int)
    )
    assert raw16.dtype == jnp.bfloat16
    lo, hi = np.asarray(raw16.astype(jnp.float32)), forward(cfg, params, tokens)
    assert np.all(np.isfinite(lo))
    scale = np.abs(hi).max()
    assert np.abs(lo - hi).max() < 0.05 * scale
    # Same argmax almost everywhere: bfloat16 keeps the model's predictions.
    assert (lo.argmax(-1) == hi.argmax(-1)).mean() > 0.8


# --- Transformers only: positions and attention implementations -----------------------------


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_position_ids_matter(family):
    cfg = tiny_cfg(family)
    params = init_params(cfg, S)
    tokens = np.stack([random_tokens(4, (S,), V)] * 2)
    pos = np.broadcast_to(np.arange(S), (B, S))
    base = forward(cfg, params, tokens, pos)
    spread = forward(cfg, params, tokens, 2 * pos)
    assert np.abs(base - spread).max() > 1e-3
    shifted = forward(cfg, params, tokens, pos + 5)
    if cfg.position == "learned":
        assert np.abs(base - shifted).max() > 1e-3
    else:  # rotary attention sees only position differences
        np.testing.assert_allclose(base, shifted, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_model_logits_equal_across_attention_impls(family):
    cfg = tiny_cfg(family, attention="xla")
    params = init_params(cfg, S)
    tokens = np.stack([random_tokens(5, (S,), V), random_tokens(6, (S,), V)])
    seg = np.stack([np.r_[np.ones(10), np.full(6, 2)], np.ones(S)]).astype(np.int32)
    pos = np.stack([np.r_[np.arange(10), np.arange(6)], np.arange(S)])
    xla = forward(cfg, params, tokens, pos, seg)
    ref = forward(dataclasses.replace(cfg, attention="reference"), params, tokens, pos, seg)
    np.testing.assert_allclose(xla, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",
        pytest.param("lstm", marks=pytest.mark.slow),
        pytest.param("hawk", marks=pytest.mark.slow),
    ],
)
def test_return_hidden_is_what_the_tied_head_reads(family):
    cfg = load_config(None, [*TINY_LM, f"model.family={family}"]).model
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, cfg.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))["params"]
    apply = jax.jit(model.apply, static_argnames="return_hidden")
    hidden_BxSxD = apply({"params": params}, tokens, return_hidden=True)
    logits_BxSxV = apply({"params": params}, tokens)
    assert hidden_BxSxD.shape == (2, 7, cfg.d_model)
    expected = hidden_BxSxD @ params["embed"]["embedding"].T  # tied embeddings
    assert jnp.allclose(logits_BxSxV, expected, atol=1e-5)
